"""The family registry (adapters/registry.py): `register_family` refuses duplicates and bad
arguments; an unregistered family with standard fused experts is pruned by structure; a registered
rule or adapter class is used and verified; a dense model is refused naming the supported families."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from factories import random_token_batches, tiny_model
from optimum_grape import (GrapeConfig, GrapePruner, RegistrationError, UnsupportedModelError, register_family,
                           unregister_family)
from optimum_grape.adapters import FAMILIES, FusedExpertsAdapter, find_moe_layers, get_adapter
from optimum_grape.adapters.routing import describe, learnt


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


def pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, **kwargs))


def test_dense_model_names_the_supported_families():
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="mixtral.*olmoe.*qwen3_moe|Supported MoE families"):
        pruner(pruning_ratio=0.25).calibrate(dense, random_token_batches())
