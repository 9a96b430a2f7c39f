"""Safeguards of GRAPE's default allocation, as pure functions: per-layer caps on the budget and
super-expert protection.

- Caps: the paper warns that "if a few layers exhibit extremely high redundancy, the greedy
  strategy can collapse the model unless the entropy threshold is carefully tuned". A cap bounds
  what one layer may lose to a multiple of the uniform cut, whatever gamma is.
- Super experts (Su et al., arXiv 2507.23279): a handful of experts produce rare, extreme outliers in
  their down_proj output that feed the massive activations and attention sinks of the whole model;
  removing three of 6,144 collapses Qwen3-30B-A3B. They are never merged or dropped.
"""

from __future__ import annotations

import math

import torch

from .budget import uniform_removals


def layer_caps(num_experts: dict[int, int], floors: dict[int, int], budget: int, factor: float | None
               ) -> dict[int, int]:
    """Most experts each layer may lose: `factor` times the average cut (budget / layers), never
    less than the layer's uniform share (so the uniform plan always fits) nor more than its floor
    allows. `factor=None`: no cap beyond the floors."""
    room = {l: n - floors[l] for l, n in num_experts.items()}
    if factor is None:
        return room
    uniform = uniform_removals(num_experts, floors, budget)
    bound = math.ceil(factor * budget / len(num_experts))
    return {l: min(room[l], max(uniform[l], bound)) for l in num_experts}


def super_experts(max_outputs: dict[int, torch.Tensor], quantile: float = 0.995, factor: float = 10.0
                  ) -> dict[int, list[int]]:
    """Experts whose largest |output| is an outlier model-wide: above the `quantile` of every expert's
    maximum AND at least `factor` times their median. The paper locates super experts by such
    extreme down_proj outputs; the two thresholds are ours (a model without massive activations
    then has none, and a large one has a handful)."""
    layers = sorted(l for l, v in max_outputs.items() if v is not None)
    if not layers:
        return {}
    values = torch.cat([max_outputs[l].double() for l in layers])
    cut = max(float(values.quantile(quantile)), factor * float(values.median()))
    out = {l: [e for e, v in enumerate(max_outputs[l].tolist()) if v > cut] for l in layers}
    return {l: e for l, e in out.items() if e}
