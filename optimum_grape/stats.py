"""`ExpertStats`: what calibration measured, per MoE layer and expert. Saved as safetensors
(atomically), and checked when read back (`validation.py`): a tampered file is refused.

This is the boundary between measuring (calibration, which needs the model) and planning (pure,
which needs only these tensors), so a plan can be recomputed or compared across methods without
running the model again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint.staging import clean_stale_staging, staging_path
from .errors import CheckpointError, StatsError
from .validation import check_stats_tensors, parse_stats_header

HEADER_KEY = "grape_stats"

_TENSOR_FIELDS = ("router_weight", "tokens", "weight_mass", "saliency", "max_output", "similarity", "mean_output",
                  "router_logits", "expert_outputs")


@dataclass
class LayerStats:
    """Statistics of one MoE layer. Per-expert vectors are float64 and indexed by original expert id."""

    num_experts: int
    floor: int  # fewest experts this layer may keep: max(top_k, user floor)
    routing: dict  # RoutingSpec.to_dict(): lets planning re-route without the model
    router_weight: torch.Tensor  # [E, H] router rows (router-guided methods, attaching dropped experts)
    tokens: torch.Tensor  # [E] tokens routed to each expert (count-guided / frequency)
    weight_mass: torch.Tensor  # [E] sum of routing weights received
    saliency: torch.Tensor  # [E] REAP: mean over routed tokens of g_j(x) * ||f_j(x)||_2
    max_output: torch.Tensor | None = None  # [E] largest |output| on routed tokens (super experts)
    similarity: torch.Tensor | None = None  # [E, E] expert-output similarity on the same tokens
    mean_output: torch.Tensor | None = None  # [E, H] mean expert output (C-Prune embedding)
    router_logits: torch.Tensor | None = None  # [T, E] on the sampled tokens
    expert_outputs: torch.Tensor | None = None  # [E, T, H] on the sampled tokens (enumerate only)
    # End to end: {"kl": KL to the unpruned model on held-aside tokens when only this layer loses
    # "merges" experts by the method's probe clusters, "local_cost": their summed relative merge cost}
    sensitivity: dict | None = None


@dataclass
class ExpertStats:
    layers: dict[int, LayerStats]
    metadata: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> dict[int, int]:
        return {l: s.num_experts for l, s in self.layers.items()}

    @property
    def floors(self) -> dict[int, int]:
        return {l: s.floor for l, s in self.layers.items()}

    def save(self, path: str | Path) -> None:
        """Write to `path` atomically (a hidden file beside it, then a rename). An existing file is
        replaced only if it holds optimum-grape statistics: never model weights or anything else."""
        path = Path(path)
        if path.exists() and not is_stats_file(path):
            raise CheckpointError(f"{str(path)!r} exists and is not an optimum-grape statistics file; it is never "
                                  "replaced. Choose another path.")
        tensors, layer_meta = {}, {}
        for index, layer in self.layers.items():
            layer_meta[str(index)] = {"num_experts": layer.num_experts, "floor": layer.floor,
                                      "routing": layer.routing, "sensitivity": layer.sensitivity}
            for name in _TENSOR_FIELDS:
                value = getattr(layer, name)
                if value is not None:
                    tensors[f"layers.{index}.{name}"] = value.detach().cpu().contiguous()
        header = {HEADER_KEY: json.dumps({"metadata": self.metadata, "layers": layer_meta})}
        clean_stale_staging(path)
        partial = staging_path(path, "partial")
        try:
            save_file(tensors, str(partial), metadata=header)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> "ExpertStats":
        """Read and check a statistics file (header and tensors: `validation.py`); StatsError when it
        is not one, or was edited into an inconsistent state."""
        header, tensors = _read(Path(path))
        layers, metadata = parse_stats_header(header, {f.name for f in fields(LayerStats)} - set(_TENSOR_FIELDS))
        check_stats_tensors(layers, tensors, _TENSOR_FIELDS)
        stats = {index: LayerStats(**meta, **{name: tensors.get(f"layers.{index}.{name}") for name in _TENSOR_FIELDS})
                 for index, meta in sorted(layers.items())}
        return cls(layers=stats, metadata=metadata)


def _read(path: Path) -> tuple[object, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(HEADER_KEY)
            if text is None:
                raise StatsError(f"{str(path)!r} is a safetensors file without a '{HEADER_KEY}' header: not statistics "
                                 "written by optimum-grape (ExpertStats.save / --save-stats).")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise StatsError(f"Cannot read statistics {str(path)!r}: {err}; pass a file written by ExpertStats.save "
                         "(CLI: --save-stats).") from None
    try:
        return json.loads(text), tensors
    except json.JSONDecodeError as err:
        raise StatsError(f"The '{HEADER_KEY}' header of {str(path)!r} is not valid JSON ({err}); the file was "
                         "edited or damaged.") from None


def is_stats_file(path: Path) -> bool:
    """A safetensors file with optimum-grape's statistics header."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return HEADER_KEY in (handle.metadata() or {})
    except (SafetensorError, OSError):
        return False
