"""Registered pruning methods. Adding one: docs/methods.md, 'Adding a method'."""

from .base import (AUTO, METHODS, Candidate, NEEDS, Hyperparameter, PruningMethod, attach_dropped, get_method, list_methods,
                   register_method, resolve_allocation, resolve_merge)
from .baselines import EnumerateMethod, FrequencyMethod, LocalMergeMethod, RandomMethod, ReapMethod, RouterMergeMethod
from .cprune import CPruneMethod
from .grape import GrapeMethod

for _method in (GrapeMethod(), CPruneMethod(), FrequencyMethod(), ReapMethod(), RouterMergeMethod(),
                LocalMergeMethod(), EnumerateMethod(), RandomMethod()):
    register_method(_method)

__all__ = ["AUTO", "METHODS", "Candidate", "NEEDS", "Hyperparameter", "PruningMethod", "attach_dropped", "get_method", "list_methods",
           "register_method", "resolve_allocation", "resolve_merge"]
