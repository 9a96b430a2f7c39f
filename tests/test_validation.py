"""Strict reading of plans and statistics from outside (validation.py): a plan must partition each
layer's experts, keep at least the router's top-k, carry finite merge and router weights that sum to
1, name only MoE layers and fit the model it was made for (unless forced); a statistics file must be
consistent with itself, and its floor with the router. Through the library and through the CLI,
which runs in this process (`cli.main`) and exits with status 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from factories import random_token_batches, tiny_model
from helpers import cli_prune, model_unchanged, write_json
from optimum_grape import ExpertStats, GrapeConfig, GrapePruner, PruningPlan
from optimum_grape.errors import PlanError, StatsError


def pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, **kwargs))


def edited_stats(source, tmp_path, edit_header=None, edit_tensors=None):
    """A copy of a statistics file with its header (dict) and/or tensors (dict) edited in place."""
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as handle:
        header = json.loads(handle.metadata()["grape_stats"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata={"grape_stats": json.dumps(header)})
    return out


# -- plans ------------------------------------------------------------------------------------------
def test_plan_must_partition_the_experts():
    from optimum_grape import GrapeError, PruningPlan

    with pytest.raises(GrapeError, match="partition experts 0..3 exactly once"):
        PruningPlan(clusters={0: [[0, 1], [1, 2], [3]]}, num_experts_before={0: 4})
    with pytest.raises(GrapeError, match="merge_weights do not match"):
        PruningPlan(clusters={0: [[0, 1], [2], [3]]}, num_experts_before={0: 4}, merge_weights={0: [[1.0]] * 3})


def test_plan_naming_a_dense_layer_is_refused():
    from optimum_grape import GrapeError, PruningPlan

    model = tiny_model("mixtral")
    plan = PruningPlan(clusters={9: [[0, 1]] + [[e] for e in range(2, 8)]}, num_experts_before={9: 8})
    with pytest.raises(GrapeError, match="not an MoE layer"):
        pruner(pruning_ratio=0.25).apply(model, plan)


def one_cluster(plan: dict, layer: str = "0") -> dict:
    plan = copy.deepcopy(plan)
    plan.pop("experts_per_layer")
    plan["clusters"][layer] = [list(range(8))]
    plan["merge_weights"][layer] = [[1 / 8] * 8]
    plan["router_weights"][layer] = [[1.0] + [0.0] * 7]
    return plan


def test_plan_below_the_routers_top_k_is_refused(tmp_path, capsys, base_folder, planned):
    plan = write_json(tmp_path / "plan.json", one_cluster(planned["plan"]))
    code, err = cli_prune(capsys, base_folder, "--output", tmp_path / "o", "--plan", plan)
    assert code == 2 and "layer 0 with 1 expert(s)" in err and "top 2" in err
    assert not (tmp_path / "o").exists()


def merged_cluster(plan: dict) -> tuple[str, int]:
    """(layer, index) of the first cluster that merges several experts."""
    return next((layer, i) for layer, clusters in sorted(plan["clusters"].items())
                for i, cluster in enumerate(clusters) if len(cluster) > 1)


def _set(name, value):
    def edit(plan):
        layer, i = merged_cluster(plan)
        plan[name][layer][i] = value(plan[name][layer][i])
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_set("merge_weights", lambda w: [float("nan")] * len(w)), "finite numbers"),
    (_set("merge_weights", lambda w: [0.0] * len(w)), "sum to 1"),
    (_set("merge_weights", lambda w: [-1.0] + [2.0] + [0.0] * (len(w) - 2)), "lie in [0, 1]"),
    (_set("merge_weights", lambda w: [1e30] * len(w)), "lie in [0, 1]"),
    (_set("router_weights", lambda w: [float("inf")] * len(w)), "finite numbers"),
    (_set("router_weights", lambda w: [0.5] * len(w)), "sum to 1"),
    (lambda plan: plan.pop("merge_weights"), "missing ['merge_weights']"),
    (lambda plan: plan["merge_weights"].pop("3"), "no merge_weights for layers [3]"),
])
def test_bad_weights_are_refused(planned, edit, needle):
    plan = copy.deepcopy(planned["plan"])
    edit(plan)
    with pytest.raises(PlanError) as err:
        PruningPlan.from_dict(plan)
    assert needle in str(err.value)


def test_bad_weights_through_the_cli(tmp_path, capsys, base_folder, planned):
    plan = copy.deepcopy(planned["plan"])
    _set("merge_weights", lambda w: [float("nan")] * len(w))(plan)
    code, err = cli_prune(capsys, base_folder, "--output", tmp_path / "o", "--plan",
                          write_json(tmp_path / "p.json", plan))
    assert code == 2 and f"merge_weights[{merged_cluster(plan)[0]}]" in err and not (tmp_path / "o").exists()


def test_plan_for_another_model_is_refused():
    from optimum_grape import GrapeError

    model = tiny_model("mixtral")
    p = pruner(pruning_ratio=0.25)
    plan = p.plan(p.calibrate(model, random_token_batches()))
    other = tiny_model("mixtral", experts=6)
    with pytest.raises(GrapeError, match="planned on"):
        p.apply(other, plan)


def test_a_plan_for_another_model_is_refused_unless_forced(tmp_path, capsys, base_folder, planned, ws):
    plan = PruningPlan.from_dict(planned["plan"])
    assert plan.model_fingerprint["architecture"] == "MixtralForCausalLM"
    same = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16)  # dtype does not matter
    GrapePruner(pruning_ratio=0.25).apply(same, PruningPlan.from_dict(planned["plan"]))
    other = tiny_model("mixtral", seed=1)  # same shapes, other weights
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PlanError, match="made for a different model.*check_model=False"):
        GrapePruner(pruning_ratio=0.25).apply(other, plan)
    assert model_unchanged(other, state, [8] * 4)
    GrapePruner(pruning_ratio=0.25).apply(other, plan, check_model=False)

    tiny_model("mixtral", seed=1).save_pretrained(ws)  # the CLI: BASE is now another model
    path = write_json(tmp_path / "plan.json", planned["plan"])
    code, err = cli_prune(capsys, ws, "--output", tmp_path / "o", "--plan", path)
    assert code == 2 and "--force-plan" in err and not (tmp_path / "o").exists()
    assert cli_prune(capsys, ws, "--output", tmp_path / "o", "--plan", path, "--force-plan")[0] == 0


# -- statistics -------------------------------------------------------------------------------------
def test_tampered_statistics_cannot_lower_the_floor(tmp_path, capsys, base_folder, planned):
    def floor_one(header):
        header["layers"]["0"]["floor"] = 1

    with pytest.raises(StatsError, match="floor=1 must lie between the router's top_k=2"):
        ExpertStats.load(edited_stats(planned["stats"], tmp_path, floor_one))

    def floor_and_top_k_one(header):  # consistent with itself, not with the model
        header["layers"]["0"]["floor"] = 1
        header["layers"]["0"]["routing"]["top_k"] = 1

    tampered = edited_stats(planned["stats"], tmp_path, floor_and_top_k_one)
    # 25 = 7 from layer 0 (down to 1 expert) + 6 from each other layer: only possible with the lowered floor
    code, err = cli_prune(capsys, base_folder, "--output", tmp_path / "o", "--stats", tampered,
                      "--num-experts-to-prune", "25")
    assert code == 2 and "layer 0 with 1 expert(s)" in err and not (tmp_path / "o").exists()


def _drop(key):
    return lambda tensors: tensors.pop(key)


def _put(key, value):
    def edit(tensors):
        tensors[key] = value(tensors[key]).contiguous()
    return edit


@pytest.mark.parametrize("header, tensors, needle", [
    (lambda h: h.pop("layers"), None, "expected ['layers', 'metadata']"),
    (lambda h: h["layers"].update({"x": h["layers"]["0"]}), None, "key 'x' is not a decoder-layer index"),
    (lambda h: h["layers"]["0"].update(num_experts=9), None, "router_weight has shape (8, 32), expected [9, 32]"),
    (lambda h: h["layers"]["0"].update(num_experts="8"), None, "num_experts='8' must be an integer"),
    (lambda h: h["layers"]["0"].pop("routing"), None, "lacks ['routing']"),
    (lambda h: h["layers"]["0"]["routing"].update(scoring="relu"), None, "routing.scoring='relu'"),
    (lambda h: h["layers"]["0"].update(floor=99), None, "floor=99"),
    (None, _drop("layers.1.tokens"), "layer 1 tokens is missing"),
    (None, _put("layers.1.tokens", lambda t: t[:-1]), "tokens has shape (7,), expected [8]"),
    (None, _put("layers.1.router_weight", lambda t: t[:-1]), "router_weight has shape (7, 32), expected [8, 32]"),
    (None, _put("layers.1.similarity", lambda t: t.fill_(float("nan"))), "NaN"),
    (None, _put("layers.1.tokens", lambda t: -t), "negative"),
    (None, _put("layers.1.saliency", lambda t: t.long()), "dtype torch.int64"),
    (None, lambda t: t.update({"layers.0.secret": torch.zeros(8)}), "'layers.0.secret'"),
])
def test_tampered_statistics_files_are_refused(tmp_path, planned, header, tensors, needle):
    with pytest.raises(StatsError) as err:
        ExpertStats.load(edited_stats(planned["stats"], tmp_path, header, tensors))
    assert needle in str(err.value)
