"""Registered pruning methods. Adding one: docs/methods.md, 'Adding a method'."""

from .base import METHODS, PruningMethod, attach_dropped, get_method, list_methods, register_method, resolve_allocation
from .grape import GrapeMethod

register_method(GrapeMethod())

__all__ = ["METHODS", "PruningMethod", "attach_dropped", "get_method", "list_methods", "register_method",
           "resolve_allocation"]
