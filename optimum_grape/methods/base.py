"""The method protocol and its registry: every way of choosing experts produces clusters in the
same form, so every method can be compared under the same budget and plan format."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import GrapeConfigError, RegistrationError
from ..stats import ExpertStats

# What a method may ask calibration to record beyond routing counts, weight mass and saliency
# (always recorded: they come free with the forward pass).
# A hyperparameter value meaning "measure it" (GRAPE's entropy_tolerance: candidates scored end to end).
AUTO = "auto"
NEEDS = frozenset({"similarity", "mean_output", "router_logits", "expert_outputs"})


@dataclass
class Candidate:
    """One of several plans a method offers for the same budget (e.g. GRAPE's allocations for
    different gammas); `GrapePruner.plan(stats, model)` scores them end to end and keeps the best."""

    name: str
    clusters: dict[int, list[list[int]]]
    metadata: dict = field(default_factory=dict)
    merge: str | None = None  # how its clusters become experts; None: the configured merge


@dataclass(frozen=True)
class Hyperparameter:
    """A key a method reads from `GrapeConfig.method_kwargs`: a number (or a non-empty list of
    numbers) in [low, high], an integer when `integer`."""

    help: str
    low: float | None = None
    high: float | None = None
    integer: bool = False
    many: bool = False

    def fits(self, v) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (not self.integer or isinstance(v, int)) and (self.low is None or v >= self.low)
                and (self.high is None or v <= self.high))

    def check(self, name: str, value) -> None:
        ok = all(map(self.fits, value)) if self.many and isinstance(value, list) and value else \
            not self.many and self.fits(value)
        if not ok:
            kind = "integer" if self.integer else "number"
            what = f"a non-empty list of {kind}s" if self.many else ("an " if self.integer else "a ") + kind
            low = "-inf" if self.low is None else self.low
            high = "inf" if self.high is None else self.high
            raise GrapeConfigError(f"method_kwargs[{name!r}]={value!r} must be {what} in [{low}, {high}]: {self.help}.")


class PruningMethod:
    """Subclass, set the class attributes, implement `cluster`, and `register_method(...)` it."""

    name: str = ""
    needs: frozenset[str] = frozenset()
    allocations: tuple[str, ...] = ("global", "uniform")
    default_allocation: str = "uniform"
    default_merge: str = "drop"
    merges: tuple[str, ...] = ("weighted", "saliency", "drop")
    default_router: str = "representative"
    # Merges tried on every candidate when the config leaves `merge` unset and candidates are scored
    # end to end (the method's default first); one entry: no choice.
    merge_choices: tuple[str, ...] = ()
    reference: str = ""
    # The keys this method reads from GrapeConfig.method_kwargs; any other key is refused.
    hyperparameters: dict[str, Hyperparameter] = {}

    def check_kwargs(self, kwargs: dict) -> None:
        """Refuse unknown (e.g. misspelt) keys and out-of-range values, naming the known keys."""
        unknown = sorted(set(kwargs) - set(self.hyperparameters))
        if unknown:
            known = {k: h.help for k, h in sorted(self.hyperparameters.items())} or "none"
            raise GrapeConfigError(f"method_kwargs {unknown} are not read by method {self.name!r}; its keys: {known}.")
        for key, value in kwargs.items():
            self.hyperparameters[key].check(key, value)

    def cluster(self, stats: ExpertStats, budget: int, floors: dict[int, int], allocation: str,
                config) -> tuple[dict[int, list[list[int]]], dict]:
        """Clusters of original expert ids per layer (any order) plus metadata for the plan.

        metadata["representatives"] = {layer: [ids]} names the expert that must represent (and, under
        merge='drop', be the only survivor of) its cluster; otherwise the most-routed member does."""
        raise NotImplementedError

    def candidates(self, stats: ExpertStats, budget: int, floors: dict[int, int], allocation: str,
                   config) -> list[Candidate] | None:
        """Several plans to choose between end to end, the fallback (used when no model is at hand to
        score them) first; None when `cluster` gives the one plan (default)."""
        return None

    def probe(self, stats: ExpertStats, budget: int, floors: dict[int, int], allocation: str, config
              ) -> dict[int, tuple[list[list[int]], float]] | None:
        """Per layer, clusters whose end-to-end effect calibration should measure when only that layer
        is pruned, with their summed local cost (stored as `LayerStats.sensitivity`); None: no probe."""
        return None

    def replan_layer(self, similarity: torch.Tensor, keep: int, protected: set[int]) -> list[list[int]] | None:
        """Clusters of one layer from a similarity measured again on its current inputs (sequential
        merging), keeping `keep` experts; None: this method cannot re-plan a single layer."""
        return None

    def check(self, num_experts: dict[int, int], config, floors: dict[int, int] | None = None) -> None:
        """Refuse, before calibration, a configuration this method cannot run (default: accept)."""

    def merge_weights(self, layer: int, stats: ExpertStats, clusters: list[list[int]], mode: str,
                      config) -> list[list[float]] | None:
        """Method-specific merge weights for `mode`; None means the standard ones (merging.cluster_weights)."""
        return None


METHODS: dict[str, PruningMethod] = {}


def register_method(method: PruningMethod) -> PruningMethod:
    if not method.name:
        raise RegistrationError("A pruning method needs a name: set the class attribute `name` (e.g. name = \"my_method\").")
    if method.name in METHODS:
        raise RegistrationError(f"Pruning method {method.name!r} is already registered; choose another name "
                                f"(registered: {sorted(METHODS)}).")
    unknown = set(method.needs) - NEEDS
    if unknown:
        raise RegistrationError(f"Method {method.name!r} needs unknown statistics {sorted(unknown)}; known: {sorted(NEEDS)}.")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise GrapeConfigError(f"GrapeConfig.method={name!r} is not a registered method; choose one of {list_methods()}.")
    return METHODS[name]


def list_methods() -> list[str]:
    return sorted(METHODS)


def resolve_merge(method: PruningMethod, requested: str | None) -> str:
    merge = requested or method.default_merge
    if merge not in method.merges:
        raise GrapeConfigError(
            f"merge={merge!r} does not apply to method {method.name!r}, which supports {list(method.merges)}; "
            "set merge to one of those."
        )
    return merge


def resolve_allocation(method: PruningMethod, requested: str | None) -> str:
    allocation = requested or method.default_allocation
    if allocation not in method.allocations:
        raise GrapeConfigError(
            f"allocation={allocation!r} does not apply to method {method.name!r}, which supports "
            f"{list(method.allocations)}; set allocation to one of those."
        )
    return allocation


def keep_result(kept: dict[int, list[int]], stats: ExpertStats, metadata: dict | None = None):
    """(clusters, metadata) for methods that choose experts to keep: kept ones represent their clusters."""
    return attach_dropped(kept, stats), {**(metadata or {}), "representatives": kept}


def attach_dropped(kept: dict[int, list[int]], stats: ExpertStats) -> dict[int, list[list[int]]]:
    """Turn a per-layer set of kept experts into a partition: each removed expert joins the kept
    expert whose router row is most alike (the one its tokens most likely go to now). Under
    merge='drop' it simply disappears; under merge='weighted' it is averaged in."""
    out = {}
    for layer, keep in kept.items():
        st = stats.layers[layer]
        clusters = {k: [k] for k in sorted(keep)}
        for e in range(st.num_experts):
            if e in clusters:
                continue
            target = _nearest(e, sorted(keep), st)
            clusters[target].append(e)
        out[layer] = list(clusters.values())
    return out


def _nearest(expert: int, keep: list[int], st) -> int:
    """Most similar kept expert: by output similarity when measured, else by router-row cosine."""
    if st.similarity is not None:
        return max(keep, key=lambda k: (float(st.similarity[expert, k]), -k))
    rows = torch.nn.functional.normalize(st.router_weight.double(), dim=-1)
    return max(keep, key=lambda k: (float(rows[expert] @ rows[k]), -k))
