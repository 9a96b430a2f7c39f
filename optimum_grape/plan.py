"""`PruningPlan`: the outcome of planning, as plain data a user can read, edit and re-apply.

Per MoE layer (keyed by decoder-layer index): the clusters of ORIGINAL expert ids that become one
expert each (representative first), and the weights used to merge each cluster. A plan also records
the fingerprint of the model it was computed for (`adapters/fingerprint.py`), so that applying it to another
model is refused. Reading and checking the fields strictly is `validation.py`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from .errors import PlanError
from .validation import check_plan, check_plan_dict, check_plan_weights_present, normalise_plan


# A plan of 100 layers x 1,024 experts with its weights and candidates is a few MB; a longer file is
# not a plan (and its metadata would be copied into every checkpoint).
MAX_PLAN_CHARS = 16 * 1024 * 1024


@dataclass
class PruningPlan:
    clusters: dict[int, list[list[int]]]
    num_experts_before: dict[int, int]
    # Per layer, a convex combination per cluster; a layer left out keeps each cluster's
    # representative (plan files must give every layer: `from_dict`).
    merge_weights: dict[int, list[list[float]]] = field(default_factory=dict)
    router_weights: dict[int, list[list[float]]] = field(default_factory=dict)
    method: str = "grape"
    router: str = "representative"
    align_neurons: bool = False
    metadata: dict = field(default_factory=dict)
    # {"model_type", "architecture", "router_sha256"} of the model planned on ({}: unknown, not checked).
    model_fingerprint: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Read the fields strictly and check them (PlanError); also run before every apply."""
        normalise_plan(self)
        check_plan(self)

    def merge_weights_of(self, layer: int) -> list[list[float]]:
        """The layer's merge weights; a layer left out keeps each cluster's representative."""
        from .algorithms.merging import cluster_weights

        return self.merge_weights.get(layer) or cluster_weights(self.clusters[layer], None, "drop")

    def router_weights_of(self, layer: int) -> list[list[float]]:
        """The layer's router-row weights; a layer left out follows the plan's `router` rule."""
        from .algorithms.merging import router_weights

        return self.router_weights.get(layer) or router_weights(self.clusters[layer], self.router)

    def restricted_to(self, layers) -> "PruningPlan":
        """The same plan for `layers` only (layer-by-layer mode applies one layer at a time)."""
        keep = [l for l in sorted(self.clusters) if l in set(layers)]
        return PruningPlan(clusters={l: self.clusters[l] for l in keep},
                           num_experts_before={l: self.num_experts_before[l] for l in keep},
                           merge_weights={l: self.merge_weights[l] for l in keep if l in self.merge_weights},
                           router_weights={l: self.router_weights[l] for l in keep if l in self.router_weights},
                           method=self.method, router=self.router, align_neurons=self.align_neurons,
                           metadata=dict(self.metadata), model_fingerprint=dict(self.model_fingerprint))

    @property
    def experts_per_layer(self) -> dict[int, int]:
        return {layer: len(c) for layer, c in sorted(self.clusters.items())}

    @property
    def kept_experts(self) -> dict[int, list[int]]:
        """The representative (original id) of each kept expert, per layer."""
        return {layer: [c[0] for c in clusters] for layer, clusters in sorted(self.clusters.items())}

    @property
    def num_removed(self) -> int:
        return sum(self.num_experts_before.values()) - sum(self.experts_per_layer.values())

    def summary(self) -> str:
        before = sum(self.num_experts_before.values())
        kept = list(self.experts_per_layer.values())
        return (f"{self.method}: {len(kept)} MoE layers, {before} routed experts, removing {self.num_removed} "
                f"({self.num_removed / before:.0%}): per-layer kept = {kept}")

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "router": self.router,
            "align_neurons": self.align_neurons,
            "num_experts_before": {str(k): v for k, v in sorted(self.num_experts_before.items())},
            "experts_per_layer": {str(k): v for k, v in self.experts_per_layer.items()},
            "clusters": {str(k): v for k, v in sorted(self.clusters.items())},
            # Written for every layer, defaults included, so that the file says exactly what is applied.
            "merge_weights": {str(k): self.merge_weights_of(k) for k in sorted(self.clusters)},
            "router_weights": {str(k): self.router_weights_of(k) for k in sorted(self.clusters)},
            "metadata": self.metadata,
            "model_fingerprint": self.model_fingerprint,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        """A plan from its JSON form, strictly: every structural field present and well typed, every
        planned layer with its weights (PlanError otherwise)."""
        plan = cls(**check_plan_dict(data, {f.name for f in fields(cls)}))
        check_plan_weights_present(plan)
        return plan

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        if len(text) > MAX_PLAN_CHARS:
            raise PlanError(f"The plan is {len(text):,} characters long, more than any plan optimum-grape writes "
                            f"({MAX_PLAN_CHARS:,} at most); pass the grape_plan.json written by optimum-grape.")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"The plan is not valid JSON ({err}); pass the grape_plan.json written by optimum-grape "
                            "or fix the syntax.") from None
        except RecursionError:
            raise PlanError("The plan nests JSON deeper than Python can read; pass the grape_plan.json written by "
                            "optimum-grape.") from None
        return cls.from_dict(data)
