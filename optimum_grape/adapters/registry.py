"""The family registry: `register_family(model_type, ...)` and how a model finds its adapter.

Resolution, for a model of `config.model_type`:
1. a registered family (the built-ins in `families.py`, or yours);
2. by structure: experts as an `nn.ModuleList` of MLPs (transformers 4.x layout, remote code);
3. by structure: fused experts (`@use_experts_implementation`) in the text decoder, with the
   generic `FusedExpertsAdapter`, whose routing rule is inferred and verified on the model;
otherwise `UnsupportedModelError` says why. Before an adapter is used on a real (not meta) model,
`find_moe_layers` has it verify itself on sample tokens (`routing.verify`), so a family whose
router or experts it does not understand is refused before calibration.
"""

from __future__ import annotations

import torch

from ..errors import RegistrationError, UnsupportedModelError
from .base import MoEAdapter, MoELayer
from .fused import FusedExpertsAdapter, decoder_of, is_fused_experts, text_config
from .modulelist import ModuleListExpertsAdapter, native_count_key

FAMILIES: dict[str, MoEAdapter] = {}
_BY_STRUCTURE: dict[str, MoEAdapter] = {}  # generic adapters made for unregistered model types


def register_family(model_type: str, adapter: MoEAdapter | type | None = None, *, count_key: str | None = None,
                    routing: dict | None = None, routing_check: str | None = None) -> MoEAdapter:
    """Register how optimum-grape prunes the MoE family `model_type` (`config.model_type`).

    With no `adapter`, the family uses the generic `FusedExpertsAdapter`: fused experts found by
    structure, routing inferred and verified on the model. `count_key` names the config key holding
    the number of experts (rewritten when every layer keeps the same count); `routing` fixes
    `RoutingSpec` fields instead of inferring them (e.g. `{"scoring": "sigmoid"}`); `routing_check`
    `"indices"` verifies only which experts the rule picks, for routers whose weights follow a rule
    planning approximates. For a real oddity pass an adapter (instance or class) overriding what
    differs (docs/adding_a_family.md). A model type can be registered once; registering it again
    raises `RegistrationError` (call `unregister_family` first to replace it on purpose).
    """
    if not isinstance(model_type, str) or not model_type:
        raise RegistrationError(f"model_type must be a non-empty string (config.model_type), got {model_type!r}.")
    if model_type in FAMILIES:
        raise RegistrationError(
            f"The MoE family {model_type!r} is already registered (with {type(FAMILIES[model_type]).__name__}); "
            "call optimum_grape.unregister_family(model_type) first to replace it.")
    if routing_check not in (None, "exact", "indices"):
        raise RegistrationError(f"routing_check={routing_check!r}: use 'exact' (experts and weights) or 'indices'.")
    if adapter is None:
        adapter = FusedExpertsAdapter((model_type,), count_key, routing, routing_check)
    else:
        adapter = adapter() if isinstance(adapter, type) else adapter
        if not isinstance(adapter, MoEAdapter):
            raise RegistrationError(f"adapter must be an MoEAdapter (instance or class), got {type(adapter).__name__}.")
        for name, value in (("count_key", count_key), ("routing", routing), ("routing_check", routing_check)):
            if value is not None:
                setattr(adapter, name, value)
        adapter.model_types = tuple(dict.fromkeys((*adapter.model_types, model_type)))
    FAMILIES[model_type] = adapter
    _BY_STRUCTURE.pop(model_type, None)
    return adapter


def unregister_family(model_type: str) -> MoEAdapter:
    if model_type not in FAMILIES:
        raise RegistrationError(f"No MoE family {model_type!r} is registered; registered: {supported_model_types()}.")
    return FAMILIES.pop(model_type)


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    """Register `adapter` for each of its `model_types` (same rules as `register_family`)."""
    for model_type in adapter.model_types:
        register_family(model_type, adapter)
    return adapter


def supported_model_types() -> list[str]:
    """Registered families. Unregistered families with standard fused experts work too (verified on use)."""
    return sorted(FAMILIES)


def _unsupported(model_type, model=None) -> UnsupportedModelError:
    experts = [(n, m) for n, m in (model.named_modules() if model is not None else ()) if n.rsplit(".", 1)[-1] == "experts"]
    if experts:
        name, module = experts[0]
        fused = isinstance(getattr(module, "down_proj", None), torch.nn.Parameter) or any(
            p.dim() == 3 for p in module.parameters(recurse=False))
        why = ("the experts are fused tensors but their class is not decorated with transformers' "
               "`@use_experts_implementation`, so calibration cannot observe them" if fused else
               "they are neither an nn.ModuleList of MLPs beside a router nor transformers' fused experts")
        return UnsupportedModelError(
            f"model_type {model_type!r}: {len(experts)} MoE block(s) such as {name!r} ({type(module).__name__}) are "
            f"not supported: {why}. Register the family with an adapter for this layout (docs/adding_a_family.md).")
    return UnsupportedModelError(
        f"model_type {model_type!r} has no optimum-grape adapter and no MoE block was recognised by structure "
        f"(fused experts in the text decoder, or experts as an nn.ModuleList named `experts` beside a router). "
        f"Registered MoE families: {', '.join(supported_model_types())}. A dense model has no experts to prune; "
        "for a new MoE family, see docs/adding_a_family.md (optimum_grape.register_family).")


def structural_adapter(model) -> MoEAdapter | None:
    """An adapter chosen by the model's structure, for model types with no registered family."""
    config = text_config(model.config)
    modulelist = ModuleListExpertsAdapter(native_count_key(config))
    if modulelist.find_layers(model):
        return modulelist
    _, decoder = decoder_of(model)
    experts = next((m for m in decoder.modules() if is_fused_experts(m)), None)
    if experts is None:
        return None
    model_type = model.config.model_type
    if model_type not in _BY_STRUCTURE:
        count_key = native_count_key(config, int(experts.down_proj.shape[0]))
        _BY_STRUCTURE[model_type] = FusedExpertsAdapter((model_type,), count_key)
    return _BY_STRUCTURE[model_type]


def get_adapter(model_or_config) -> MoEAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    adapter = structural_adapter(model_or_config) if hasattr(model_or_config, "named_modules") else None
    if adapter is None:
        raise _unsupported(model_type, model_or_config if hasattr(model_or_config, "named_modules") else None)
    return adapter


def find_moe_layers(model, verify: bool | None = None) -> tuple[MoEAdapter, list[MoELayer]]:
    """The model's adapter and MoE layers. With `verify` (default: unless the model is on the meta
    device), the adapter first verifies its routing and experts on sample tokens, once per model."""
    adapter = get_adapter(model)
    layers = adapter.find_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) has no MoE layers to prune.")
    if verify is None:
        verify = not layers[0].router_weight().is_meta
    prepare = getattr(adapter, "prepare", None)
    if verify and callable(prepare):
        prepare(model, layers)
    return adapter, layers
