"""optimum-grape: prune and merge the experts of Mixture-of-Experts models with one global budget.

Importing this package registers the 'grape' layout with transformers, so pruned checkpoints with
different expert counts per layer load with `AutoModelForCausalLM.from_pretrained`. The import is
light: the public names load on first use (PEP 562), and the registration happens the moment
transformers loads its quantizers (`quantizer.py`), so `import optimum_grape` imports neither torch
nor any quantization backend, and prints nothing.
"""

__version__ = "0.1.0"

import importlib

from .errors import (BudgetError, CalibrationDataError, CheckpointError, GrapeConfigError, GrapeError, PlanError,
                     RegistrationError, StatsError, UnsupportedModelError)
from .quantizer import register_with_transformers

# public name -> the module that defines it, imported on first access
_LAZY = {
    "GrapeConfig": ".config", "GrapePruner": ".pruner", "PruningPlan": ".plan", "ExpertStats": ".stats",
    "GrapeModelForCausalLM": ".modeling", "GrapeHfQuantizer": ".quantizer",
    "register_adapter": ".adapters", "register_family": ".adapters", "supported_model_types": ".adapters",
    "unregister_family": ".adapters", "list_methods": ".methods", "register_method": ".methods",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optimum_grape' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


register_with_transformers()

__all__ = ["BudgetError", "CalibrationDataError", "CheckpointError", "ExpertStats", "GrapeConfig",
           "GrapeConfigError", "GrapeError", "GrapeHfQuantizer", "GrapeModelForCausalLM", "GrapePruner", "PlanError",
           "PruningPlan", "RegistrationError", "StatsError", "UnsupportedModelError", "list_methods", "register_adapter",
           "register_family", "register_method", "supported_model_types", "unregister_family"]
