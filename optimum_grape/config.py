"""`GrapeConfig`: every user-facing knob of a pruning job, validated, and serialisable to JSON.

It doubles as a transformers quantization config (`quant_method="grape"`), which is how a pruned
checkpoint carries its per-layer expert counts in `config.json` (docs/design.md, "Per-layer counts in config.json") and how
`from_pretrained(..., quantization_config=GrapeConfig(...))` prunes on load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .algorithms.merging import ROUTER_MODES
from .algorithms.similarity import SIMILARITIES
from .calibration.data import check_data_type
from .errors import GrapeConfigError
from .methods import AUTO, get_method, resolve_allocation, resolve_merge

# The largest calibration seed: numpy generators take at most 2**32 - 1 (torch 2**64 - 1).
MAX_SEED = 2**32 - 1
ALLOCATIONS = ("global", "uniform")
MERGE_MODES = ("weighted", "saliency", "drop", "affinity")
# A field left at PRESET takes its value from the chosen preset (docs/methods.md, "Presets").
PRESET = "preset"
PRESETS = {
    # Safe and usage-aware: merge cost (gate mass x squared output distance, relative to the layer's
    # output energy), at most twice the average cut per layer, super experts kept, and gamma chosen
    # among candidates (uniform included) by KL to the unpruned model on held-aside calibration text.
    "default": {"similarity": "merge_cost", "entropy_tolerance": AUTO, "layer_cap": 2.0,
                "protect_super_experts": True},
    # The paper's Algorithm 1 as published, with the choices it leaves open closed as in
    # docs/methods.md: linear CKA (as its predecessor DEK), gamma = 0.1 (a third-party port's value),
    # no cap, no protection, no candidate search.
    "paper": {"similarity": "cka", "entropy_tolerance": 0.1, "layer_cap": None, "protect_super_experts": False},
}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GrapeConfigError(f"GrapeConfig.{name}={value!r} is not one of {list(allowed)}; pick one of those.")


@dataclass
class GrapeConfig(QuantizationConfigMixin):
    """How to prune the routed experts of an MoE model.

    Exactly one of `pruning_ratio` and `num_experts_to_prune` sets the budget, counted over the
    routed experts of all MoE layers together.
    """

    quant_method: str = field(default="grape", metadata={"help": "Fixed; names this config to transformers."})
    method: str = field(default="grape", metadata={"help": "Registered method: see optimum_grape.list_methods()."})
    preset: str = field(
        default="default",
        metadata={"help": "Values of the fields left at 'preset': 'default' (safe, usage-aware GRAPE) or 'paper' "
                  "(the published Algorithm 1: CKA, gamma=0.1, no cap, no protection). See docs/methods.md."},
    )
    pruning_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of all routed experts to remove, in (0, 1)."}
    )
    num_experts_to_prune: int | None = field(
        default=None, metadata={"help": "Exact number of routed experts to remove in total (>= 1)."}
    )
    allocation: str | None = field(
        default=None,
        metadata={"help": "'global': one budget spent where redundancy is (GRAPE); 'uniform': same cut per layer. "
                  "None: the method's default (global for grape and cprune, uniform for the local baselines)."},
    )
    similarity: str = field(
        default=PRESET,
        metadata={"help": "Expert similarity: 'merge_cost' (expected error of merging two experts: gate mass x "
                  "squared output distance, relative to the layer's output energy), 'cka' (linear CKA), 'cosine' "
                  "or 'mse'. Preset: merge_cost (default), cka (paper)."},
    )
    # The paper gives no value for gamma (docs/methods.md); 'auto' measures instead of guessing.
    entropy_tolerance: float | str = field(
        default=PRESET,
        metadata={"help": "GRAPE's gamma in [0, 1]: allowed relative drop of the allocation entropy, or 'auto': "
                  "plan with several gammas and the uniform allocation, keep the one whose pruned model is "
                  "closest (KL) to the unpruned one on held-aside calibration text. Preset: auto (default), 0.1 "
                  "(paper)."},
    )
    layer_cap: float | None = field(
        default=PRESET,
        metadata={"help": "GRAPE global: a layer may lose at most layer_cap x the average cut (budget / MoE layers), "
                  "and never less than its uniform share; None: only the floors bound it. Preset: 2.0 (default), "
                  "None (paper)."},
    )
    protect_super_experts: bool = field(
        default=PRESET,
        metadata={"help": "GRAPE: never merge experts with extreme output outliers (super experts, arXiv "
                  "2507.23279). Preset: True (default), False (paper)."},
    )
    selection_samples: int = field(
        default=8,
        metadata={"help": "Calibration sequences held aside (after the num_samples used for statistics) to score "
                  "candidate plans end to end when entropy_tolerance='auto'."},
    )
    min_experts_per_layer: int = field(
        default=1, metadata={"help": "Floor on experts kept per MoE layer; the router's top-k is always a floor too."}
    )
    merge: str | None = field(
        default=None,
        metadata={"help": "'weighted': routing-frequency-weighted average into the representative; 'saliency': "
                  "weighted by REAP saliency mass (tokens x mean gate x output norm, as REAM); 'drop': keep it "
                  "only; 'affinity': C-Prune's softmax(gamma A) weights (cprune only). None: the method's default."},
    )
    # Averaging experts neuron-by-neuron without alignment mixes unrelated neurons (docs/methods.md).
    align_neurons: bool = field(
        default=True,
        metadata={"help": "Before averaging a cluster, permute each member's intermediate neurons to match the "
                  "representative (weight matching, Hungarian algorithm). No effect with merge='drop'."},
    )
    align_on_activations: bool = field(
        default=True,
        metadata={"help": "Match neurons on their activations on the layer's calibration inputs as well as on their "
                  "weights (REAM). Merges then run layer by layer with calibration data (merging/with_data.py)."},
    )
    refit: bool = field(
        default=False,
        metadata={"help": "Refit each merged expert's down projection by ridge least squares so that it reproduces "
                  "its members' contribution on the calibration tokens routed to it (kept only where it helps)."},
    )
    sequential: bool = field(
        default=False,
        metadata={"help": "Re-plan each layer's clusters (same count) on the inputs its already-merged predecessors "
                  "produce, in model order (REAM's sequential merging; GRAPE, local_merge)."},
    )
    merge_tokens: int = field(
        default=8192, metadata={"help": "Calibration tokens per layer used when merging with data."}
    )
    layer_by_layer: bool = field(
        default=False,
        metadata={"help": "Prune a checkpoint from disk without loading it whole: one decoder layer in memory at a "
                  "time, the pruned checkpoint written as the layers stream (GrapePruner.prune_checkpoint; CLI "
                  "--layer-by-layer). Same plan and weights as the in-memory path. Where the output's disk has "
                  "room for the model twice, each layer is converted once and kept in a scratch copy beside the "
                  "output between passes (deleted as the job ends)."},
    )
    router: str | None = field(
        default=None,
        metadata={"help": "Router row of a merged expert: the 'representative' row or the 'mean' of the cluster's "
                  "rows. None: the method's default (mean for cprune, representative otherwise)."},
    )
    dataset: Any = field(
        default=None,
        metadata={"help": "Calibration text: a local .txt file, a saved `datasets` folder, or a list of strings. "
                  "None uses the calibration text shipped with optimum-grape."},
    )
    num_samples: int = field(default=64, metadata={"help": "Calibration sequences."})
    sequence_length: int = field(default=256, metadata={"help": "Tokens per calibration sequence."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per calibration forward pass."})
    # Bounds the similarity pass: every expert runs on this many sampled tokens of its layer.
    max_tokens_per_layer: int = field(
        default=512, metadata={"help": "Tokens per layer on which every expert is run to compare experts."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for token sampling and randomised methods."})
    method_kwargs: dict = field(default_factory=dict, metadata={"help": "Method-specific hyperparameters."})
    # Written by the pruner, never by users: what the checkpoint's MoE layers look like after pruning.
    pruned_layout: dict | None = field(
        default=None, metadata={"help": "Set by the pruner: per-layer expert counts and clusters of a pruned model."}
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise GrapeConfigError(f"GrapeConfig.preset={self.preset!r} is not one of {sorted(PRESETS)}.")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) == PRESET:
                setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        if self.quant_method != "grape":
            raise GrapeConfigError(f"GrapeConfig.quant_method must be 'grape', got {self.quant_method!r}.")
        if self.pruned_layout is None:
            self._validate_budget()
        resolve_allocation(get_method(self.method), self.allocation)
        if self.merge is not None:
            resolve_merge(get_method(self.method), self.merge)
        if self.allocation is not None:
            _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("similarity", self.similarity, SIMILARITIES)
        if self.merge is not None:
            _choice("merge", self.merge, MERGE_MODES)
        if self.router is not None:
            _choice("router", self.router, ROUTER_MODES)
        gamma = self.entropy_tolerance
        if gamma != AUTO and (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0):
            raise GrapeConfigError(
                f"GrapeConfig.entropy_tolerance={gamma!r} must be a number in [0, 1] or 'auto' (measured choice)."
            )
        cap = self.layer_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap)
                                or cap < 1.0):
            raise GrapeConfigError(
                f"GrapeConfig.layer_cap={cap!r} must be a finite number >= 1 (times the average cut per layer) or "
                "None (no cap)."
            )
        if not isinstance(self.protect_super_experts, bool):
            raise GrapeConfigError(
                f"GrapeConfig.protect_super_experts={self.protect_super_experts!r} must be True or False.")
        if isinstance(self.selection_samples, bool) or not isinstance(self.selection_samples, int) \
                or self.selection_samples < 0:
            raise GrapeConfigError(f"GrapeConfig.selection_samples={self.selection_samples!r} must be an integer >= 0 "
                                   "(0 skips the end-to-end choice and plans with the uniform candidate).")
        for name, low in (("min_experts_per_layer", 1), ("num_samples", 1), ("sequence_length", 2),
                          ("batch_size", 1), ("max_tokens_per_layer", 8), ("merge_tokens", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise GrapeConfigError(f"GrapeConfig.{name}={value!r} must be an integer >= {low}.")
        for name in ("align_neurons", "align_on_activations", "refit", "sequential", "layer_by_layer"):
            if not isinstance(getattr(self, name), bool):
                raise GrapeConfigError(f"GrapeConfig.{name}={getattr(self, name)!r} must be True or False.")
        if not isinstance(self.method_kwargs, dict):
            raise GrapeConfigError(f"GrapeConfig.method_kwargs must be a dict, got {type(self.method_kwargs).__name__}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise GrapeConfigError(f"GrapeConfig.seed={self.seed!r} must be an integer in [0, {MAX_SEED}] (the range "
                                   "every random generator used here accepts); e.g. 0.")
        if self.pruned_layout is None:  # a saved checkpoint's config is not re-judged on load
            get_method(self.method).check_kwargs(self.method_kwargs)
            check_data_type(self.dataset, "GrapeConfig.dataset")

    def _validate_budget(self) -> None:
        ratio, count = self.pruning_ratio, self.num_experts_to_prune
        if (ratio is None) == (count is None):
            raise GrapeConfigError(
                "Set exactly one budget: GrapeConfig(pruning_ratio=0.25) or GrapeConfig(num_experts_to_prune=N); "
                f"got pruning_ratio={ratio!r}, num_experts_to_prune={count!r}."
            )
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
            raise GrapeConfigError(f"GrapeConfig.pruning_ratio={ratio!r} is a {type(ratio).__name__}, not a number; "
                                   "pass a float such as 0.25 (a quarter of the routed experts).")
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise GrapeConfigError(f"GrapeConfig.pruning_ratio={ratio!r} is outside (0, 1); e.g. 0.25 removes a quarter.")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise GrapeConfigError(f"GrapeConfig.num_experts_to_prune={count!r} must be an integer >= 1.")

    def budget_for(self, total_routed_experts: int) -> int:
        """Number of experts to remove from a model with this many routed experts in all."""
        if self.num_experts_to_prune is not None:
            return self.num_experts_to_prune
        return int(round(self.pruning_ratio * total_routed_experts))

    # Serialisation: plain JSON types only, so that to_dict -> from_dict round-trips exactly.
    def to_dict(self) -> dict[str, Any]:
        return {f.name: json.loads(json.dumps(getattr(self, f.name))) for f in fields(self)}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise GrapeConfigError(f"Unknown GrapeConfig fields {unknown}; known fields are {sorted(known)}.")
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if key in known:
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json(cls, text: str) -> "GrapeConfig":
        return cls.from_dict(json.loads(text))
