"""The embedded default model: it loads offline, its tokenizer round-trips text, and it is a real
language model (beats the bigram baseline recorded when it was trained), and the README's main job
gives the figures its quickstart paragraph quotes."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_grape.cli import default_model_path, heldout_paths
from optimum_grape.evaluation.perplexity import perplexity, text_token_ids


@pytest.fixture(scope="module")
def default():
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


def test_loads_and_is_a_mixtral_moe(default):
    model, _, path = default
    assert model.config.model_type == "mixtral"
    assert model.config.num_hidden_layers >= 6 and model.config.num_local_experts >= 8
    assert not model.config.output_router_logits
    assert sum(f.stat().st_size for f in path.iterdir()) < 30e6


def test_tokenizer_round_trips_text(default):
    _, tok, _ = default
    for text in ("Fellow-Citizens of the Senate and House of Representatives:",
                 "And God said, Let there be light: and there was light.",
                 "def f(x):\n    return sorted(x, key=len)  # 42"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_heldout_perplexity_beats_the_bigram_baseline(default):
    model, tok, path = default
    summary = json.loads((path / "training_summary.json").read_text())
    for held in heldout_paths():
        bigram = summary["heldout_perplexity"][held.stem]["bigram_ppl"]
        ids = text_token_ids(tok, held.read_text(encoding="utf-8"))[:1024]
        ppl = perplexity(model, ids, window=256)
        assert ppl < bigram, (held.stem, ppl, bigram)


def test_routing_is_balanced_in_every_layer_on_held_out_text(default):
    """The testbeds' realism targets (benchmarks/testbeds/balance.py): every expert of every layer
    takes at least 1/(4E) of its layer's routings and each layer's routing entropy is >= 0.95 of
    the maximum, on a held-out slice."""
    import math

    from optimum_grape import GrapeConfig, GrapePruner

    model, tok, _ = default
    texts = [p.read_text(encoding="utf-8")[:12_000] for p in heldout_paths()]
    stats = GrapePruner(GrapeConfig(method="frequency", pruning_ratio=0.25, num_samples=64,
                                    selection_samples=0)).calibrate(model, texts, tok)
    for layer, s in stats.layers.items():
        share = s.tokens / s.tokens.sum()
        entropy = float(-(share * share.log()).sum()) / math.log(len(share))
        assert float(share.min()) >= 1 / (4 * len(share)), (layer, share.tolist())
        assert entropy >= 0.95, (layer, entropy)


def test_the_readme_main_job_gives_the_figures_the_readme_quotes(tmp_path, capsys):
    # The quickstart's main command as written (output folder moved to tmp), against the paragraph
    # below it: the counts kept per layer and every perplexity before -> after (ratio).
    import re
    import shlex
    from pathlib import Path

    from optimum_grape.cli import main

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = re.search(r"<!-- quickstart:main -->\n```bash\n(.*)\n```", readme).group(1)
    args = shlex.split(command.split("&&")[-1])[1:]  # after `optimum-grape`
    args[args.index("--output") + 1] = str(tmp_path / "out")
    paragraph = " ".join(readme[readme.index("With its defaults GRAPE measures"):].split("\n\n")[0].split())
    assert main(args) == 0
    out = capsys.readouterr().out
    kept = re.search(r"per-layer kept = (\[[\d, ]+\])", out).group(1)
    assert f"`{kept}`" in paragraph
    for domain, before, after, ratio in re.findall(r"held-out perplexity \[(\w+)\]: ([\d.]+) -> ([\d.]+) \(([\d.]+x)\)",
                                                   out):
        assert f"`{domain}` {before} -> {after} ({ratio})" in paragraph, (domain, before, after, ratio)
