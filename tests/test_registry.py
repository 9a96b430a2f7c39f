"""Registering families and verifying adapters: `register_family` refuses duplicates; an unregistered
family with standard fused experts works by structure; an adapter that does not reproduce the
model's own routing or experts refuses the model before calibration, saying why."""

import pytest
import torch

from factories import random_token_batches, tiny_model
from helpers import logits
from optimum_grape import (GrapeConfig, GrapePruner, RegistrationError, UnsupportedModelError, register_family,
                           unregister_family)
from optimum_grape.adapters import FAMILIES, FusedExpertsAdapter, find_moe_layers, get_adapter
from optimum_grape.adapters.routing import describe, learnt
from optimum_grape.coverage.tiny import build_tiny, scale_like_trained


def small_pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, batch_size=4, max_tokens_per_layer=64,
                                   **kwargs))


def renamed_mixtral(model_type: str):
    model = tiny_model("mixtral")
    model.config.model_type = model_type
    return model


def test_registering_a_family_twice_is_refused():
    with pytest.raises(RegistrationError, match="'mixtral' is already registered.*unregister_family"):
        register_family("mixtral", count_key="num_local_experts")
    with pytest.raises(RegistrationError, match="non-empty string"):
        register_family("")
    with pytest.raises(RegistrationError, match="routing_check"):
        register_family("brand_new_moe", routing_check="weights")
    with pytest.raises(RegistrationError, match="MoEAdapter"):
        register_family("brand_new_moe", adapter=object())
    assert "brand_new_moe" not in FAMILIES


def test_unregistered_family_with_standard_fused_experts_is_pruned_by_structure():
    model = renamed_mixtral("brand_new_moe")
    adapter, layers = find_moe_layers(model)
    assert "brand_new_moe" not in FAMILIES and adapter.count_key == "num_local_experts"
    assert describe(learnt(layers[0])) == "softmax, top-2, renormalised"
    small_pruner(pruning_ratio=0.25, allocation="uniform").prune(model, random_token_batches(n=4, length=16))
    assert model.config.num_local_experts == 6  # uniform counts: the native key is rewritten


def test_register_family_fixes_the_rule_and_the_model_is_verified_against_it():
    register_family("sigmoid_moe", count_key="num_local_experts", routing={"scoring": "sigmoid"})
    try:
        with pytest.raises(UnsupportedModelError, match="routing rule not recognised.*sigmoid, top-2"):
            small_pruner(pruning_ratio=0.25).check(renamed_mixtral("sigmoid_moe"))
    finally:
        unregister_family("sigmoid_moe")


def test_register_family_with_an_adapter_class():
    class EvenLayersOnly(FusedExpertsAdapter):  # the generic fused adapter, keeping odd layers whole
        def accepts(self, name, block, router):
            return int(name.split(".")[2]) % 2 == 0

    adapter = register_family("even_moe", EvenLayersOnly, count_key="num_local_experts")
    try:
        model = renamed_mixtral("even_moe")
        assert get_adapter(model) is adapter and adapter.model_types == ("even_moe",)
        assert [l.index for l in find_moe_layers(model)[1]] == [0, 2]
        before = {k: v.clone() for k, v in model.state_dict().items() if ".layers.1." in k or ".layers.3." in k}
        small_pruner(pruning_ratio=0.25).prune(model, random_token_batches(n=4, length=16))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        assert model.config.num_local_experts == 8  # experts left whole still read the native count key
    finally:
        unregister_family("even_moe")


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


def test_methods_needing_router_logits_are_refused_before_calibration_when_the_router_reads_other_inputs():
    model = build_tiny("gemma4")  # the router reads the residual, the experts a normed copy of it
    scale_like_trained(model)
    with pytest.raises(UnsupportedModelError, match="does not read the experts' input.*router_merge"):
        small_pruner(pruning_ratio=0.25, method="router_merge").calibrate(model, [])  # [] would fail later


def test_a_multimodal_model_has_only_its_text_decoder_pruned():
    model = build_tiny("qwen3_vl_moe")
    scale_like_trained(model)
    _, layers = find_moe_layers(model)
    assert all(layer.name.startswith("model.language_model.layers.") for layer in layers)
    towers = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.language_model.")}
    small_pruner(pruning_ratio=0.25).prune(model, random_token_batches(n=4, length=16, vocab=90))
    assert towers and all(torch.equal(model.state_dict()[k], v) for k, v in towers.items())
    counts = [n for n in model.config.num_local_experts_per_layer if n is not None]
    assert sum(counts) == 6 * len(layers) and model.config.text_config.num_experts in (8, 6)
