"""optimum-grape: prune and merge the experts of Mixture-of-Experts models with one global budget.

Importing this package registers the 'grape' layout with transformers, so pruned checkpoints with
different expert counts per layer load with `AutoModelForCausalLM.from_pretrained`.
"""

__version__ = "0.1.0"

from .adapters import register_adapter, register_family, supported_model_types, unregister_family
from .config import GrapeConfig
from .errors import (BudgetError, CalibrationDataError, CheckpointError, GrapeConfigError, GrapeError, PlanError,
                     RegistrationError, StatsError, UnsupportedModelError)
from .methods import list_methods, register_method
from .modeling import GrapeModelForCausalLM
from .plan import PruningPlan
from .pruner import GrapePruner
from .quantizer import GrapeHfQuantizer, register_with_transformers
from .stats import ExpertStats

register_with_transformers()

__all__ = ["BudgetError", "CalibrationDataError", "CheckpointError", "ExpertStats", "GrapeConfig",
           "GrapeConfigError", "GrapeError", "GrapeHfQuantizer", "GrapeModelForCausalLM", "GrapePruner", "PlanError",
           "PruningPlan", "RegistrationError", "StatsError", "UnsupportedModelError", "list_methods", "register_adapter",
           "register_family", "register_method", "supported_model_types", "unregister_family"]
