"""Model-family adapters, registered by `config.model_type`. The only place that knows families."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import MoEAdapter, MoELayer, RoutingSpec
from .fused import FusedExpertsAdapter, MixtralAdapter, OlmoeAdapter, Qwen3MoeAdapter

ADAPTERS: dict[str, MoEAdapter] = {}


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    """Register `adapter` for each of its `model_types`; refuses to silently replace one."""
    for model_type in adapter.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"An adapter for model_type {model_type!r} is already registered.")
        ADAPTERS[model_type] = adapter
    return adapter


for _adapter in (MixtralAdapter(), Qwen3MoeAdapter(), OlmoeAdapter()):
    register_adapter(_adapter)


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config) -> MoEAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no optimum-grape adapter. Supported MoE families: "
            f"{', '.join(supported_model_types())}. A dense model has no experts to prune; for a new MoE "
            "family, add an adapter (docs/adding_a_family.md)."
        )
    return ADAPTERS[model_type]


def find_moe_layers(model) -> tuple[MoEAdapter, list[MoELayer]]:
    adapter = get_adapter(model)
    layers = adapter.find_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) has no MoE layers to prune."
        )
    return adapter, layers


__all__ = ["ADAPTERS", "MoEAdapter", "MoELayer", "RoutingSpec", "FusedExpertsAdapter", "find_moe_layers",
           "get_adapter", "register_adapter", "supported_model_types"]
