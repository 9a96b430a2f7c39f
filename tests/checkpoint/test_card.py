"""The model card template, rendered from folder contents alone (no model): Hub metadata that
huggingface_hub reads back, the per-layer table with redundancy and the plot, optional sections
(allocation candidates) only when the plan has them, and folders without a plan."""

import json

from huggingface_hub import ModelCard

from optimum_grape import PruningPlan
from optimum_grape.checkpoint.card import PLOT_FILE, render_model_card, set_repo_id, write_inputs, write_model_card

CONFIG = {"model_type": "mixtral", "num_local_experts_per_layer": [4, 3],
          "quantization_config": {"quant_method": "grape", "method": "grape", "pruned_layout": {"x": 1}}}


def write_folder(folder, metadata=None, inputs=None):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    plan = PruningPlan(clusters={0: [[0], [1], [2], [3]], 1: [[0, 1], [2], [3]]}, num_experts_before={0: 4, 1: 4},
                       metadata=metadata or {})
    (folder / "grape_plan.json").write_text(plan.to_json())
    write_inputs(folder, inputs or {})
    return folder


def test_metadata_table_plot_and_candidates(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    from optimum_grape.checkpoint.card import base_license

    inputs = {"base_model": "org/base", "license": base_license(base),
              "evaluation": {"perplexity (x)": {"before": 10.0, "after": 12.0, "ratio": 1.2, "how": "h", "dataset": "x"}}}
    metadata = {"allocation": "global", "merge": "weighted", "similarity": "cka",
                "layer_redundancy": {"0": 0.1, "1": 0.7},
                "candidates": [{"name": "uniform", "experts_per_layer": [3, 4], "score": 0.2},
                               {"name": "gamma=0.03", "experts_per_layer": [4, 3], "score": 0.1}],
                "selection": {"metric": "KL", "tokens": 64, "chosen": "gamma=0.03"}}
    folder = write_folder(tmp_path / "p", metadata, inputs)
    write_model_card(folder)
    text = (folder / "README.md").read_text()
    data = ModelCard.load(folder / "README.md").data
    assert data.base_model == "org/base" and data.base_model_relation == "finetune" and data.license == "apache-2.0"
    assert data.eval_results[0].metric_type == "perplexity" and data.eval_results[0].metric_value == 12.0
    assert "| 1 | 4 | 3 | 0.7000 | {0, 1} |" in text and f"]({PLOT_FILE})" in text
    assert (folder / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert "## Allocation candidates" in text and "| gamma=0.03 | [4, 3] | 0.10000 | yes |" in text
    assert '"pruned_layout"' not in text  # internal layout stays out of the hyperparameters
    set_repo_id(folder, "me/pruned")
    assert 'from_pretrained("me/pruned")' in (folder / "README.md").read_text()


def test_optional_sections_are_left_out_gracefully(tmp_path):
    bare = write_folder(tmp_path / "bare", {"candidates": "not a list of dicts"})
    text = render_model_card(bare)
    assert "## Allocation candidates" not in text and "redundancy" not in text.split("## Calibration")[0].lower()
    assert "base_model" not in text and "## Evaluation" not in text and "model-index" not in text
    no_plan = tmp_path / "noplan"
    no_plan.mkdir()
    (no_plan / "config.json").write_text(json.dumps(CONFIG))
    text = render_model_card(no_plan)
    assert "no `grape_plan.json`" in text and "## Experts per layer" not in text


def test_text_from_a_shared_plan_cannot_add_html_links_or_rows_to_the_card(tmp_path):
    # issue 25: plan metadata and grape_card.json were copied verbatim into README.md
    evil = "<script>alert(1)</script> [click](javascript:alert(1)) | x |\n# Heading ```"
    metadata = {"allocation": evil, "merge": evil, "similarity": evil * 1000,
                "candidates": [{"name": evil, "experts_per_layer": evil, "score": "NaN"}],
                "selection": {"metric": evil, "tokens": evil, "chosen": evil}}
    inputs = {"base_model": "org/name\n[x](javascript:1)",
              "evaluation": {evil: {"before": 1.0, "after": 2.0, "how": evil, "dataset": "x"}}}
    folder = write_folder(tmp_path / "p", metadata, inputs)
    text = render_model_card(folder, repo_or_path='x") ; import os ; os.system("echo' + "\n```")
    body = text.split("---", 2)[2]
    assert "<script>" not in text and "\n# Heading" not in text
    assert "](javascript:" not in body.replace("\\](javascript:", "")  # only as escaped text, never a link
    assert "&lt;script&gt;" in body and "\\[click\\]" in body
    assert max(len(line) for line in body.splitlines() if "&lt;script" in line) < 600  # long text is cut
    assert "base_model" not in text.split("---", 2)[1]  # not a repository id: left out of the metadata
    assert body.count("```") % 2 == 0  # every code fence is closed where the template closes it
    assert 'from_pretrained("x\\") ; import os ; os.system(\\"echo \\u0060\\u0060\\u0060")' in body


def test_a_plot_drawn_ahead_is_the_plot_the_card_would_draw_and_a_stale_one_is_redrawn(tmp_path):
    from optimum_grape.checkpoint.card import plot_ahead

    metadata = {"layer_redundancy": {"0": 0.1, "1": 0.7}}
    in_place = write_folder(tmp_path / "in_place", metadata)
    write_model_card(in_place)
    ahead = write_folder(tmp_path / "ahead", metadata)
    plot_ahead(PruningPlan.from_json((ahead / "grape_plan.json").read_text()), ahead)
    write_model_card(ahead)
    assert (ahead / PLOT_FILE).read_bytes() == (in_place / PLOT_FILE).read_bytes()
    stale = write_folder(tmp_path / "stale", metadata)
    plot_ahead(PruningPlan(clusters={0: [[0], [1], [2], [3]], 1: [[0], [1], [2], [3]]}, num_experts_before={0: 4, 1: 4}),
               stale)  # not the plan the folder holds
    write_model_card(stale)
    assert (stale / PLOT_FILE).read_bytes() == (in_place / PLOT_FILE).read_bytes()
