"""Where the hidden neurons of one fused expert live, so that `algorithms/alignment.py` can permute
a merged member's neurons to match its cluster's representative before averaging.

A fused experts module declares its layout in flags: `is_transposed` ([E, H, 2I] instead of
[E, 2I, H]), `has_gate` (gate and up halves in one tensor), `is_concatenated` (halves back to back,
or interleaved as in gpt-oss), `has_bias`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms.alignment import match_neurons, paired_index


def neuron_axes(experts: nn.Module) -> dict[str, tuple[int, bool]]:
    """Per expert tensor (one expert's slice): (axis indexing intermediate neurons, holds gate and up pairs)."""
    t = experts.is_transposed
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    axes = {up: (1 if t else 0, experts.has_gate), "down_proj": (0 if t else 1, False)}
    if experts.has_bias:
        axes[up + "_bias"] = (0, experts.has_gate)
    return axes


def neuron_features(experts: nn.Module, e: int, axes) -> torch.Tensor:
    """[I, F]: every weight touching each intermediate neuron of expert `e` (gate row, up row, down column)."""
    interleaved = not getattr(experts, "is_concatenated", True)
    parts = []
    for name in ("gate_up_proj", "up_proj", "down_proj"):
        if name not in axes:
            continue
        x = getattr(experts, name)[e].detach().double().movedim(axes[name][0], 0)  # [I or 2I, F]
        if axes[name][1]:
            n = x.shape[0] // 2
            x = torch.cat([x[0::2], x[1::2]] if interleaved else [x[:n], x[n:]], dim=1)
        parts.append(x)
    return torch.cat(parts, dim=1)


def aligned_expert_tensors(experts: nn.Module, clusters, weights, activations=None
                           ) -> dict[str, dict[int, torch.Tensor]]:
    """Per expert tensor name, {member: its row with neurons permuted to match the cluster's
    representative (members[0])}, for every member that is averaged into a cluster; rows not listed
    are used as stored (`combine_rows(..., replaced=...)`), so no copy of the whole tensor is made.
    `activations(e)` -> [I, T], when given, matches neurons on their activations on calibration
    tokens as well as their weights."""
    axes = neuron_axes(experts)
    interleaved = not getattr(experts, "is_concatenated", True)
    out: dict[str, dict[int, torch.Tensor]] = {name: {} for name in axes}
    for members, w in zip(clusters, weights):
        ref = neuron_features(experts, members[0], axes)
        ref_acts = activations(members[0]) if activations is not None else None
        for m, wm in zip(members[1:], w[1:]):
            if wm == 0.0:
                continue
            perm = match_neurons(ref, neuron_features(experts, m, axes), ref_acts,
                                 activations(m) if activations is not None else None)
            for name, (axis, paired) in axes.items():
                index = paired_index(perm, interleaved) if paired else perm
                tensor = getattr(experts, name).detach()
                out[name][m] = tensor[m].index_select(axis, index.to(tensor.device))
    return out
