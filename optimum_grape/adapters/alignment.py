"""Where the hidden neurons of one fused expert live, so that `algorithms/alignment.py` can permute
a merged member's neurons to match its cluster's representative before averaging.

A fused experts module declares its layout in flags: `is_transposed` ([E, H, 2I] instead of
[E, 2I, H]), `has_gate` (gate and up halves in one tensor), `is_concatenated` (halves back to back,
or interleaved as in gpt-oss), `has_bias`.

Matching a member's neurons to its representative's (a Hungarian assignment over [I, I] cosines) is
the costly step of merging. Planning applies many candidate plans that share most clusters, so
inside `reused_alignments()` a weight-only match is computed once per (experts tensors,
representative, member) and reused: the same tensors give the same permutation. A tensor is the
same while it is the same object, or when it was read from the same place of a checkpoint
(`SOURCE_ATTRIBUTE`, set by layer-by-layer mode, which reads each layer once per pass).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ..algorithms.alignment import match_unit_neurons, paired_index, unit_rows_
from ..runtime.memory import return_free_memory


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


_REUSED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("grape_reused_alignments", default=None)


@contextlib.contextmanager
def reused_alignments(store: dict | None = None):
    """Within the block, weight-only neuron matches are computed once and reused (see the module
    docstring); `store` keeps them across blocks (the pruner's, from the sensitivity probe to the final
    apply). Entries hold weak references to the tensors they were computed from and count only while
    those very tensors are alive, so a tensor replaced by merging never matches a stale entry."""
    token = _REUSED.set(store if store is not None else (_REUSED.get() if _REUSED.get() is not None else {}))
    try:
        yield
    finally:
        _REUSED.reset(token)


# Set on a parameter read from a checkpoint file (layer-by-layer mode reads a layer again for every
# pass): the same source gives the same tensor, so its matches are reused across passes too.
SOURCE_ATTRIBUTE = "_grape_source"


# An alignment's float64 features and [I, I] cosines are the largest temporaries of merging (50 MB
# each for a Mixtral-sized expert); handing them back right away keeps a layer's merge from piling
# up freed heap. Trimming walks the whole heap, so the many small alignments of a fine-grained layer
# (128 experts of 256 neurons: 3 MB of features) skip it.
TRIM_AFTER_FEATURE_BYTES = 16 << 20


def _after_alignment(feature_bytes: int) -> None:
    if feature_bytes >= TRIM_AFTER_FEATURE_BYTES:
        return_free_memory()


def _weight_match(experts: nn.Module, axes, rep: int, member: int, ref) -> torch.Tensor:
    """`match_neurons` on weights only, through the `reused_alignments` cache when one is open;
    `ref()` gives the representative's features (built only on a miss)."""
    cache = _REUSED.get()
    tensors = [getattr(experts, name) for name in axes]
    sources = [getattr(t, SOURCE_ATTRIBUTE, None) for t in tensors]
    key = (tuple(s if s is not None else id(t) for s, t in zip(sources, tensors)), rep, member)
    hit = cache.get(key) if cache is not None else None
    if hit is not None and (all(s is not None for s in sources) or all(r() is t for r, t in zip(hit[0], tensors))):
        return hit[1]
    features = unit_rows_(neuron_features(experts, member, axes))
    perm = match_unit_neurons(ref(), features)
    _after_alignment(features.nbytes)
    if cache is not None:
        cache[key] = ([weakref.ref(t) for t in tensors], perm)
    return perm


def aligned_expert_tensors(experts: nn.Module, clusters, weights, activations=None
                           ) -> dict[str, "AlignedRows"]:
    """Per expert tensor name, {member: its row with neurons permuted to match the cluster's
    representative (members[0])}, for every member that is averaged into a cluster; rows not listed
    are used as stored (`combine_rows(..., replaced=...)`), so no copy of the whole tensor is made.
    The permutations are computed here; each permuted row only when it is read (`AlignedRows`), so
    merging holds one member's row at a time, not every merged member's.
    `activations(e)` -> [I, T], when given, matches neurons on their activations on calibration
    tokens as well as their weights."""
    axes = neuron_axes(experts)
    interleaved = not getattr(experts, "is_concatenated", True)
    perms: dict[int, torch.Tensor] = {}
    for members, w in zip(clusters, weights):
        averaged = [m for m, wm in zip(members[1:], w[1:]) if wm != 0.0]
        if not averaged:
            continue
        built = {}

        def ref(rep=members[0]) -> torch.Tensor:  # the representative's unit features, built once, only when needed
            if "features" not in built:
                built["features"] = unit_rows_(neuron_features(experts, rep, axes))
            return built["features"]

        ref_acts = activations(members[0]) if activations is not None else None
        for m in averaged:
            if activations is None:
                perms[m] = _weight_match(experts, axes, members[0], m, ref)
            else:
                features = unit_rows_(neuron_features(experts, m, axes))
                perms[m] = match_unit_neurons(ref(), features, ref_acts, activations(m))
                _after_alignment(features.nbytes)
    return {name: AlignedRows(getattr(experts, name).detach(), axis, paired, interleaved, perms)
            for name, (axis, paired) in axes.items()}


class AlignedRows(Mapping):
    """{member: `tensor[member]` with its neurons permuted}, each row built when it is read."""

    def __init__(self, tensor: torch.Tensor, axis: int, paired: bool, interleaved: bool,
                 perms: dict[int, torch.Tensor]) -> None:
        self.tensor, self.axis, self.paired, self.interleaved, self.perms = tensor, axis, paired, interleaved, perms

    def __getitem__(self, member: int) -> torch.Tensor:
        perm = self.perms[member]
        index = paired_index(perm, self.interleaved) if self.paired else perm
        return self.tensor[member].index_select(self.axis, index.to(self.tensor.device))

    def __iter__(self):
        return iter(self.perms)

    def __len__(self) -> int:
        return len(self.perms)
