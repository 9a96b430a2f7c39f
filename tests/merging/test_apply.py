"""Applying a plan in place (merging/apply.py): a plan failing at its last layer leaves the model
exactly as it was; a failure while changing a layer puts that layer back and says which layers were
already merged; each layer's old tensors are freed as soon as it is merged; free-form plan metadata
edited by hand cannot break the saved checkpoint."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from factories import tiny_model
from helpers import logits, model_unchanged
from optimum_grape import GrapePruner, PruningPlan
from optimum_grape.adapters import find_moe_layers
from optimum_grape.errors import PlanError


def test_a_plan_that_fails_at_its_last_layer_changes_nothing():
    model = tiny_model("mixtral")
    state, counts = {k: v.clone() for k, v in model.state_dict().items()}, [8] * 4
    clusters = {l: [[0, 1], [2, 3]] + [[e] for e in range(4, 8)] for l in range(3)}
    clusters[3] = [[0, 1]] + [[e] for e in range(2, 6)]  # planned for 6 experts: layer 3 has 8
    plan = PruningPlan(clusters=clusters, num_experts_before={0: 8, 1: 8, 2: 8, 3: 6})
    with pytest.raises(PlanError, match="Layer 3 has 8 experts but the plan was made for 6"):
        GrapePruner(pruning_ratio=0.25).apply(model, plan)
    assert model_unchanged(model, state, counts)


def test_a_failure_while_changing_a_layer_puts_it_back_and_names_the_merged_ones(monkeypatch):
    model = tiny_model("mixtral")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = find_moe_layers(model)[0]
    calls, original = [], adapter.apply_clusters

    def fail_on_third(layer, *args, **kwargs):
        calls.append(layer.index)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(adapter, "apply_clusters", fail_on_third)
    plan = PruningPlan(clusters={l: [[0, 1, 2]] + [[e] for e in range(3, 8)] for l in range(4)},
                       num_experts_before={l: 8 for l in range(4)},
                       merge_weights={l: [[0.5, 0.25, 0.25]] + [[1.0]] * 5 for l in range(4)})
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        GrapePruner(pruning_ratio=0.25).apply(model, plan)
    assert calls == [0, 1, 2]
    assert any("layers [0, 1] were already merged" in note for note in raised.value.__notes__)
    assert [layer.num_experts for layer in find_moe_layers(model)[1]] == [6, 6, 8, 8]
    third = {k: v for k, v in model.state_dict().items() if ".layers.2." in k or ".layers.3." in k}
    assert third and all(torch.equal(v, state[k]) for k, v in third.items())


def test_each_layers_old_tensors_are_freed_once_it_is_merged(monkeypatch):
    """Holding every layer's old experts until the last layer is merged would cost a second copy of the
    experts: when layer i is merged, the tensors layer i-1 had before are already gone."""
    import weakref

    model = tiny_model("mixtral")
    adapter, layers = find_moe_layers(model)
    old = {layer.index: weakref.ref(layer.experts.gate_up_proj) for layer in layers}
    alive_when_merging, original = {}, adapter.apply_clusters

    def spy(layer, *args, **kwargs):
        alive_when_merging[layer.index] = [i for i, ref in old.items() if i < layer.index and ref() is not None]
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(adapter, "apply_clusters", spy)
    plan = PruningPlan(clusters={l: [[0, 1]] + [[e] for e in range(2, 8)] for l in range(4)},
                       num_experts_before={l: 8 for l in range(4)})
    GrapePruner(pruning_ratio=0.125).apply(model, plan)
    assert alive_when_merging == {0: [], 1: [], 2: [], 3: []}


def test_edited_metadata_cannot_break_the_checkpoint(tmp_path, planned):
    """metadata is free-form; the entries code reads are recomputed (routing_overrides) or read defensively."""
    plan = copy.deepcopy(planned["plan"])
    plan["metadata"].update(calibration=5, routing_overrides={"0": {"n_group": 1}}, allocation=[None])
    model = tiny_model("mixtral")  # the model saved in base_folder, which the plan was made for
    pruner = GrapePruner(pruning_ratio=0.25)
    pruner.apply(model, PruningPlan.from_dict(plan))
    pruner.save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(logits(reloaded)).all()
