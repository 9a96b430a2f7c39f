"""Applying a plan in place (merging/apply.py): all or nothing (a plan failing at its last layer, or
a failure while changing layers, leaves the model exactly as it was), and free-form plan metadata
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


def test_a_failure_while_changing_layers_puts_every_layer_back(monkeypatch):
    model = tiny_model("mixtral")
    state, counts, before = {k: v.clone() for k, v in model.state_dict().items()}, [8] * 4, logits(model)
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
    with pytest.raises(RuntimeError, match="out of memory"):
        GrapePruner(pruning_ratio=0.25).apply(model, plan)
    assert calls == [0, 1, 2] and model_unchanged(model, state, counts)
    assert torch.equal(logits(model), before)


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
