"""The family matrix: every supported MoE family (tests/factories.py FAMILIES, plus a remote-code
model with experts in an nn.ModuleList) passes the same invariants through the same API:
keep-all is bit-exactly the identity; GRAPE merges planted copies first; a 25% prune gives the
planned counts with router and count attributes in agreement, shared experts and dense layers
untouched, `generate()` working, and equal logits after reloading in a FRESH process (one
subprocess loads every family's checkpoint). Calibration of the ModuleList model:
tests/calibration/test_hooks.py."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import FAMILIES, plant_copies, random_token_batches, tiny_model
from helpers import PROBE, logits
from optimum_grape import GrapeConfig, GrapePruner, PruningPlan
from optimum_grape.adapters import find_moe_layers
from optimum_grape.adapters.base import COUNT_ATTRIBUTES

ALL = sorted(FAMILIES) + ["modulelist"]
LOAD_KWARGS = {"modulelist": {"trust_remote_code": True}}
SHARED = {"qwen2_moe": "shared_expert.", "qwen3_next": "shared_expert.", "deepseek_v2": "shared_experts.",
          "deepseek_v3": "shared_experts.", "glm4_moe": "shared_experts.", "ernie4_5_moe": "shared_experts."}
GROUPED = ("deepseek_v2", "deepseek_v3", "glm4_moe")
COPIES = [1, 2, 3, 4, 5]


def small_config(**kwargs):
    defaults = dict(num_samples=4, sequence_length=16, batch_size=4, max_tokens_per_layer=64)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def batches():
    return random_token_batches(n=4, length=16)


def moe_module_names(model) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] + "." for l in find_moe_layers(model)[1] for m in (l.experts, l.router)]


@pytest.mark.parametrize("family", ALL)
def test_keep_all_is_bit_exact_identity(family):
    model = tiny_model(family)
    before = logits(model)
    _, layers = find_moe_layers(model)
    plan = PruningPlan(clusters={l.index: [[e] for e in range(l.num_experts)] for l in layers},
                       num_experts_before={l.index: l.num_experts for l in layers})
    GrapePruner(small_config(num_experts_to_prune=1)).apply(model, plan)
    assert torch.equal(logits(model), before)
    assert not plan.metadata.get("routing_overrides")


@pytest.mark.parametrize("family", ALL)
def test_grape_merges_planted_copies_first(family):
    model = tiny_model(family, seed=3)
    target = find_moe_layers(model)[1][-1].index
    plant_copies(model, layer=target, copies=COPIES)
    pruner = GrapePruner(small_config(num_experts_to_prune=3, preset="paper"))  # Algorithm 1 as published
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=8, length=16)))
    assert [m[0] for m in plan.metadata["merge_order"]] == [target] * 3
    for layer, clusters in plan.clusters.items():
        merged = [c for c in clusters if len(c) > 1]
        if layer == target:
            assert all(set(c) <= set(COPIES) for c in merged) and len(clusters) == 5, clusters
        else:
            assert merged == [], (layer, clusters)


def _prune_and_save(family, folder, plan=None):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moe_names = moe_module_names(model)
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    if plan is None:
        plan = pruner.plan(pruner.calibrate(model, batches()))
    pruner.apply(model, plan)
    expected = logits(model)
    generated = model.generate(PROBE[:1, :4], max_new_tokens=3, do_sample=False)
    out = pruner.save_pretrained(model, folder)
    return dict(model=model, plan=plan, before=before, moe_names=moe_names, expected=expected,
                generated=generated, out=out)


def _reload_all_in_one_process(entries: dict, work) -> dict:
    probe, result = work / "probe.safetensors", work / "reloaded.safetensors"
    save_file({"ids": PROBE.contiguous()}, str(probe))
    jobs = [(name, str(e["out"]), LOAD_KWARGS.get(name.split("-")[0], {})) for name, e in entries.items()]
    code = textwrap.dedent(f"""
        import torch, optimum_grape
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        ids, out = load_file({str(probe)!r})["ids"], {{}}
        for name, folder, kwargs in {jobs!r}:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
            with torch.no_grad():
                out[name] = model(ids).logits.contiguous()
        save_file(out, {str(result)!r})
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"fresh-process load failed:\n{run.stderr[-3000:]}"
    return load_file(str(result))


def _fallback_plan(model) -> PruningPlan:
    """DeepSeek-V3 layers (8 experts, 2 groups) cut to 6 (3 per group: grouping kept) and 5 (fallback)."""
    layers = find_moe_layers(model)[1]
    keep = {layers[0].index: [[0, 1], [2], [3], [4], [5, 6], [7]],
            layers[1].index: [[0, 1, 2], [3], [4], [5], [6, 7]]}
    clusters = {l.index: keep.get(l.index, [[e] for e in range(8)]) for l in layers}
    return PruningPlan(clusters=clusters, num_experts_before={l.index: 8 for l in layers}, method="manual")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    work = tmp_path_factory.mktemp("families")
    entries = {family: _prune_and_save(family, work / family) for family in ALL}
    entries["deepseek_v3-fallback"] = _prune_and_save("deepseek_v3", work / "fallback",
                                                      _fallback_plan(tiny_model("deepseek_v3")))
    reloaded = _reload_all_in_one_process(entries, work)
    for name, entry in entries.items():
        entry["reloaded"] = reloaded[name]
    return entries


@pytest.mark.parametrize("family", ALL)
def test_prune_gives_planned_counts_everywhere(family, pruned):
    entry = pruned[family]
    plan, model = entry["plan"], entry["model"]
    assert plan.num_removed == round(0.25 * sum(plan.num_experts_before.values()))
    adapter, layers = find_moe_layers(model)
    assert {l.index: l.num_experts for l in layers} == plan.experts_per_layer
    for layer in layers:
        n = plan.experts_per_layer[layer.index]
        if isinstance(layer.experts, torch.nn.ModuleList):
            assert len(layer.experts) == n
        else:
            assert all(p.shape[0] == n for p in layer.experts.parameters(recurse=False))
        assert all(p.shape[0] == n for p in layer.router.parameters(recurse=False))
        assert all(b.shape[0] == n for b in layer.router.buffers(recurse=False))  # e_score_correction_bias
        statics = getattr(layer.router, "moe_statics", None)
        if statics is not None:  # ERNIE: [1, E], experts on dim 1
            assert statics.e_score_correction_bias.shape == (1, n)
        for module in (layer.block, layer.experts, layer.router):
            for attr in COUNT_ATTRIBUTES:
                value = getattr(module, attr, None)
                if isinstance(value, int) and (attr != "out_features" or isinstance(module, torch.nn.Linear)):
                    assert value == n, (layer.index, type(module).__name__, attr)
    assert entry["generated"].shape == (1, 7)


@pytest.mark.parametrize("family", ALL)
def test_shared_experts_and_dense_layers_are_untouched(family, pruned):
    entry = pruned[family]
    after = entry["model"].state_dict()
    outside = [k for k in after if not any(k.startswith(n) for n in entry["moe_names"])]
    assert all(torch.equal(after[k], entry["before"][k]) for k in outside)
    if family in SHARED:
        assert any(SHARED[family] in k for k in outside)
    moe = {l.index for l in find_moe_layers(entry["model"])[1]}
    num_layers = entry["model"].config.num_hidden_layers
    dense = [i for i in range(num_layers) if i not in moe]
    assert all(any(k.startswith(f"model.layers.{i}.mlp.") for k in outside) for i in dense)


@pytest.mark.parametrize("family", ALL + ["deepseek_v3-fallback"])
def test_reload_in_a_fresh_process_gives_equal_logits(family, pruned):
    entry = pruned[family]
    config = json.loads((entry["out"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "grape"
    counts = entry["plan"].experts_per_layer
    assert config["num_local_experts_per_layer"] == [counts.get(i) for i in range(config["num_hidden_layers"])]
    assert torch.allclose(entry["reloaded"], entry["expected"], atol=1e-5)


@pytest.mark.parametrize("family", GROUPED + ("deepseek_v3-fallback",))
def test_grouped_routing_keeps_groups_or_falls_back_on_record(family, pruned):
    entry = pruned[family]
    overrides = entry["plan"].metadata.get("routing_overrides", {})
    config = entry["model"].config
    for layer in find_moe_layers(entry["model"])[1]:
        n, groups = layer.num_experts, config.n_group
        grouped = n % groups == 0 and n // groups >= 2 and config.topk_group * (n // groups) >= layer.top_k
        if family == "deepseek_v2" and config.topk_method != "group_limited_greedy":
            grouped = True
        assert (str(layer.index) not in overrides) == grouped
        assert layer.router.num_group == (groups if grouped else 1)
    layout = json.loads((entry["out"] / "config.json").read_text())["quantization_config"]["pruned_layout"]
    assert layout["routing_overrides"] == overrides
    if overrides:
        assert "Routing changes" in (entry["out"] / "README.md").read_text()
    if family == "deepseek_v3-fallback":
        assert set(overrides) == {str(find_moe_layers(entry["model"])[1][1].index)}


def test_remote_code_checkpoint_carries_its_code(pruned):
    out = pruned["modulelist"]["out"]
    assert (out / "modeling_tiny_moe.py").exists()
    assert "auto_map" in json.loads((out / "config.json").read_text())
