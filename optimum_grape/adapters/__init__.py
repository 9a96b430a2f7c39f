"""Model-family adapters: the only place that knows MoE families.

`registry.py` resolves a model to its adapter (registered family, or found by structure and
verified); `families.py` registers the built-ins with the same public `register_family` users call.
"""

from __future__ import annotations

from .base import MoEAdapter, MoELayer, RoutingSpec
from .fused import FusedExpertsAdapter
from .modulelist import ModuleListExpertsAdapter
from .registry import (FAMILIES, find_moe_layers, get_adapter, register_adapter, register_family,
                       structural_adapter, supported_model_types, unregister_family)
from . import families  # noqa: F401,E402  (registers the built-in families)

ADAPTERS = FAMILIES  # the 0.1 name

__all__ = ["ADAPTERS", "FAMILIES", "MoEAdapter", "MoELayer", "RoutingSpec", "FusedExpertsAdapter",
           "ModuleListExpertsAdapter", "find_moe_layers", "get_adapter", "register_adapter",
           "register_family", "structural_adapter", "supported_model_types", "unregister_family"]
