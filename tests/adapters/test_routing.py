"""Verifying an adapter on the model (adapters/routing.py): a router the rule does not reproduce, or
experts computing something else, are refused before calibration, saying why; verification runs
once per model and leaves it unchanged."""

import pytest
import torch

from factories import random_token_batches, tiny_model
from helpers import logits
from optimum_grape import GrapeConfig, GrapePruner, UnsupportedModelError
from optimum_grape.adapters import find_moe_layers
from optimum_grape.adapters.routing import learnt


def small_pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, batch_size=4, max_tokens_per_layer=64,
                                   **kwargs))


def renamed_mixtral(model_type: str):
    model = tiny_model("mixtral")
    model.config.model_type = model_type
    return model


def test_a_router_the_rule_does_not_reproduce_is_refused_before_calibration():
    model = renamed_mixtral("contrarian_moe")
    router = find_moe_layers(model, verify=False)[1][1].router
    original = router.forward

    def lowest_experts(hidden):
        logits_, weights, _ = original(hidden)
        return logits_, weights, torch.topk(-logits_, 2, dim=-1).indices

    router.forward = lowest_experts
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.mlp.*routing rule not recognised.*tokens routed"):
        small_pruner(pruning_ratio=0.25).calibrate(model, random_token_batches())


def test_experts_computing_something_else_are_refused_before_calibration():
    model = renamed_mixtral("scaled_experts_moe")
    experts = find_moe_layers(model, verify=False)[1][0].experts
    original = experts.forward
    experts.forward = lambda *args, **kwargs: 2 * original(*args, **kwargs)
    with pytest.raises(UnsupportedModelError, match="experts' output is not what running each expert"):
        small_pruner(pruning_ratio=0.25).calibrate(model, random_token_batches())


def test_verification_runs_once_per_model_and_leaves_it_unchanged():
    model = tiny_model("deepseek_v3")
    before = logits(model)
    _, layers = find_moe_layers(model)
    routing = learnt(layers[0])
    assert routing.spec.scale == pytest.approx(2.5) and routing.choice_bias == "gate.e_score_correction_bias"
    assert find_moe_layers(model)[1][0].router is layers[0].router and learnt(layers[0]) is routing
    assert torch.equal(logits(model), before) and not model.training


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name_not_as_an_unknown_routing_rule(value):
    # issue 25: a NaN in one expert of layer 2 was reported as "routing rule not recognised" in layer 3
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[2].mlp.experts.down_proj[5, 0, 0] = value
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.2\.mlp\.experts\.down_proj \(expert 5\) holds "
                                                    r"NaN or Inf at index \[5, 0, 0\]"):
        GrapePruner(GrapeConfig(pruning_ratio=0.25)).check(model)
