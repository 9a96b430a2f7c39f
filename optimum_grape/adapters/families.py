"""The built-in families, registered with the public `register_family` like any user's, and the few
adapters for real oddities (each overriding only what differs from the generic fused adapter).

Families with standard fused experts need no entry at all: they are found by structure and
verified on the model. An entry here pins the native count key and documents the family.
"""

from __future__ import annotations

from torch import nn

from .base import MoELayer
from .fused import FusedExpertsAdapter
from .registry import register_family

SPARSEMIXER_TOP_K = 2


class PhimoeAdapter(FusedExpertsAdapter):
    """PhiMoE: the router is an `nn.Linear` subclass named `router` and routing is sparsemixer: the
    two highest logits, weighted by a softmax over the logits within a jitter margin of each, however
    `num_experts_per_tok` is set. Planning describes it as softmax top-2 (the same experts, other
    weights), so only the chosen experts are verified, and every layer keeps at least 2 experts."""

    routing = {"top_k": SPARSEMIXER_TOP_K, "scoring": "softmax", "norm_topk_prob": True}
    routing_check = "indices"

    def layer_floor(self, layer: MoELayer) -> int:
        return max(layer.top_k, SPARSEMIXER_TOP_K)


class DeepseekV4Adapter(FusedExpertsAdapter):
    """DeepSeek-V4: the first `mlp_layer_types == "hash_moe"` layers choose experts by a frozen
    token-id table (`gate.tid2eid`), not by the router; those layers are kept whole, like dense ones.
    The other layers are standard (sqrt-softplus scores, correction bias, renormalised, scaled)."""

    def accepts(self, name: str, block: nn.Module, router: nn.Module) -> bool:
        return not hasattr(router, "tid2eid")


class Ernie45VLMoeAdapter(FusedExpertsAdapter):
    """ERNIE-4.5-VL: each decoder layer holds a text MoE (`mlp.text_moe`) and a vision MoE
    (`mlp.vision_moe`) that only image tokens reach. The text decoder's experts are the text MoE;
    the vision experts are kept whole (calibration text never reaches them). The original checkpoint
    layout stores both as ONE expert list that loading splits in equal halves (and the correction
    biases as one [2, E] tensor), which cannot hold fewer text than vision experts: pruned checkpoints
    are saved in transformers' own layout (fused `text_moe.experts.*` keys), which it loads as is."""

    save_original_format = False

    def accepts(self, name: str, block: nn.Module, router: nn.Module) -> bool:
        return not name.endswith("vision_moe")


BUILT_IN = {  # model_type: native count key (the families optimum-grape 0.1 supported, plus oddities)
    "mixtral": "num_local_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
    "qwen2_moe": "num_experts", "qwen3_next": "num_experts", "granitemoe": "num_local_experts",
    "gpt_oss": "num_local_experts", "ernie4_5_moe": "moe_num_experts", "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts", "glm4_moe": "n_routed_experts",
}
for _model_type, _key in BUILT_IN.items():
    register_family(_model_type, count_key=_key)
register_family("phimoe", PhimoeAdapter, count_key="num_local_experts")
register_family("deepseek_v4", DeepseekV4Adapter, count_key="num_local_experts")
register_family("ernie4_5_vl_moe", Ernie45VLMoeAdapter, count_key="moe_num_experts")
