"""Planning at production scale with no weights: the real configs of Mixtral-8x7B/8x22B,
Qwen3-30B-A3B, DeepSeek-V3 and gpt-oss-20b/120b (tests/fixtures/configs) on the meta device, GRAPE
planned globally from synthetic similarities with the adapters' floors, then applied to the meta
model. Times are printed by benchmarks/plan_scale.py, never asserted here."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from plan_scale import NAMES, plan_at_scale  # noqa: E402

from optimum_grape.adapters import find_moe_layers  # noqa: E402

# (MoE layers, routed experts per layer, top-k) from the published configs
EXPECTED = {"mixtral-8x7b": (32, 8, 2), "mixtral-8x22b": (56, 8, 2), "qwen3-30b-a3b": (48, 128, 8),
            "deepseek-v3": (58, 256, 8), "gpt-oss-20b": (24, 32, 4), "gpt-oss-120b": (36, 128, 4)}


@pytest.mark.parametrize("name", NAMES)
def test_global_plan_at_scale_respects_each_family_routing(name):
    result = plan_at_scale(name)
    model, plan = result["model"], result["plan"]
    layers_expected, experts, top_k = EXPECTED[name]
    assert result["moe_layers"] == layers_expected and result["experts_per_layer_before"] == [experts]
    assert plan.num_removed == result["budget"] == round(0.25 * layers_expected * experts)
    adapter, layers = find_moe_layers(model)
    overrides = plan.metadata.get("routing_overrides", {})
    for layer in layers:
        n = plan.experts_per_layer[layer.index]
        assert layer.num_experts == n >= top_k == layer.top_k
        assert layer.experts.down_proj.shape[0] == n and layer.experts.num_experts == n
        if name == "deepseek-v3":  # 8 groups, best 4 chosen: keep whole groups of >= 2, or fall back
            grouped = n % 8 == 0 and n // 8 >= 2 and 4 * (n // 8) >= top_k
            assert (str(layer.index) not in overrides) == grouped
            assert (layer.router.num_group, layer.router.topk_group) == ((8, 4) if grouped else (1, 1))
            assert layer.router.e_score_correction_bias.shape == (n,)
        else:
            assert not overrides
    if name == "deepseek-v3":
        assert min(l.index for l in layers) == 3  # first_k_dense_replace: layers 0-2 stay dense
        # the budget (3712) is a multiple of n_group = 8: group-aware planning keeps every layer grouped
        assert not overrides
    config = model.config
    assert config.quantization_config.pruned_layout["routing_overrides"] == overrides
    assert config.num_local_experts_per_layer == [plan.experts_per_layer.get(i)
                                                  for i in range(config.num_hidden_layers)]
