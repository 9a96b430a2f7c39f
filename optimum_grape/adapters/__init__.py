"""Model-family adapters, registered by `config.model_type`. The only place that knows families.

A `model_type` with no registered adapter is tried by structure (`STRUCTURAL`): experts as an
`nn.ModuleList` of MLPs (transformers 4.x / remote code), then standard fused experts. That is how an
older or remote-code MoE works without new code.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import MoEAdapter, MoELayer, RoutingSpec
from .ernie import Ernie45MoeAdapter
from .fused import FusedExpertsAdapter, MixtralAdapter, OlmoeAdapter, Qwen3MoeAdapter, StandardFusedAdapter
from .grouped import DeepseekV2Adapter, DeepseekV3Adapter
from .modulelist import ModuleListExpertsAdapter, native_count_key
from .phimoe import PhimoeAdapter

ADAPTERS: dict[str, MoEAdapter] = {}


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    """Register `adapter` for each of its `model_types`; refuses to silently replace one."""
    for model_type in adapter.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"An adapter for model_type {model_type!r} is already registered.")
        ADAPTERS[model_type] = adapter
    return adapter


# Standard fused experts: one registry line each (model_types, native count key).
_STANDARD = {
    "granitemoe": "num_local_experts",  # router named `router`
    "gpt_oss": "num_local_experts",  # transposed, interleaved gate/up, biases: read from the experts' flags
    "qwen2_moe": "num_experts",  # shared_expert + sigmoid shared_expert_gate: never touched
    "qwen3_next": "num_experts",  # same block as qwen2_moe
}
for _adapter in (MixtralAdapter(), Qwen3MoeAdapter(), OlmoeAdapter(), PhimoeAdapter(), DeepseekV2Adapter(),
                 DeepseekV3Adapter(), Ernie45MoeAdapter(),
                 *(StandardFusedAdapter((name,), key) for name, key in _STANDARD.items())):
    register_adapter(_adapter)


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def _unsupported(model_type) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"model_type {model_type!r} has no optimum-grape adapter and no MoE block was recognised by structure "
        f"(experts as an nn.ModuleList named `experts` beside a router, or fused experts). Supported MoE "
        f"families: {', '.join(supported_model_types())}. A dense model has no experts to prune; for a new MoE "
        "family, add an adapter (docs/adding_a_family.md)."
    )


def structural_adapter(model) -> MoEAdapter | None:
    """An adapter chosen by the model's structure, for model types with no registry entry: experts as
    an nn.ModuleList. Unregistered FUSED experts are refused: their router may read attributes (groups,
    biases) that a registry line must be checked against first."""
    adapter = ModuleListExpertsAdapter(native_count_key(model.config))
    if adapter.find_layers(model):
        return adapter
    if StandardFusedAdapter((), None).find_layers(model):
        model_type = model.config.model_type
        raise UnsupportedModelError(
            f"model_type {model_type!r} has fused experts but no optimum-grape adapter. If its router only holds "
            "`weight` [E, H] (and optionally `bias`) and softmax top-k routing, add a registry line "
            f"`{model_type!r}: '<config key holding the expert count>'` to `_STANDARD` in "
            "optimum_grape/adapters/__init__.py; otherwise write an adapter (docs/adding_a_family.md).")
    return None


def get_adapter(model_or_config) -> MoEAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    adapter = structural_adapter(model_or_config) if hasattr(model_or_config, "named_modules") else None
    if adapter is None:
        raise _unsupported(model_type)
    return adapter


def find_moe_layers(model) -> tuple[MoEAdapter, list[MoELayer]]:
    adapter = get_adapter(model)
    layers = adapter.find_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) has no MoE layers to prune."
        )
    return adapter, layers


__all__ = ["ADAPTERS", "MoEAdapter", "MoELayer", "RoutingSpec", "FusedExpertsAdapter", "ModuleListExpertsAdapter",
           "find_moe_layers", "get_adapter", "register_adapter", "structural_adapter", "supported_model_types"]
