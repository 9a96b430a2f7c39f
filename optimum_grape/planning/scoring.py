"""Choosing between candidate plans end to end, as EvoESAP (arXiv 2603.06003) does for allocations:
each candidate is applied to the model in place, scored by how far its next-token distribution
moves from the unpruned model's on held-aside calibration tokens, and undone; the pruner keeps the
lowest score. The uniform allocation is always a candidate, so the choice is never worse than
uniform on these tokens.

Score: KL(unpruned || pruned) per token, over the unpruned model's top-`TOP` tokens plus one bucket
for the rest of the vocabulary. That is the exact KL of the two distributions coarsened to TOP + 1
outcomes (a lower bound of the full KL), and keeps the reference small for any vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from transformers.utils.logging import tqdm  # honours disable_progress_bar() and HF_HUB_DISABLE_PROGRESS_BARS

from ..adapters import find_moe_layers
from ..calibration import distributed
from ..merging.apply import Snapshot, apply_clusters
from ..plan import PruningPlan

logger = logging.getLogger("optimum_grape")
TOP = 256
SCORE_METRIC = ("mean KL(unpruned || pruned) per token over the unpruned model's top-256 tokens plus the rest "
                "(planning/scoring.py)")


@contextlib.contextmanager
def restored(modules):
    """Undo every change to `modules` on exit (`apply.Snapshot`: attributes, parameters, buffers,
    submodules and each parameter's tensor as they were)."""
    snapshot = Snapshot(modules)
    try:
        yield
    finally:
        snapshot.restore()


def reference_of(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpruned model's top-TOP token ids and their log-probabilities (+ the tail's), per token."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(min(TOP, logp.shape[-1]), dim=-1)
    return top.indices, _with_tail(top.values)


def _with_tail(top_logp: torch.Tensor) -> torch.Tensor:
    """Append log(1 - sum of the top probabilities) as one more outcome."""
    tail = torch.log1p(-top_logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    return torch.cat([top_logp, tail], dim=-1)


def kl_terms(logits: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, int]:
    """(summed KL over tokens, number of tokens) of `logits` from the reference."""
    index, ref_logp = ref
    new = _with_tail(torch.log_softmax(logits.float(), dim=-1).gather(-1, index))
    return float((ref_logp.exp() * (ref_logp - new)).sum(-1).sum()), ref_logp.shape[0] * ref_logp.shape[1]


def mean_kl_over_ranks(totals: list[tuple[float, int]]) -> float:
    """Mean KL per token over this rank's batches and, when calibrating across processes, every rank's."""
    summed = torch.tensor([[t for t, _ in totals], [c for _, c in totals]], dtype=torch.float64).sum(1) \
        if totals else torch.zeros(2, dtype=torch.float64)
    distributed.reduce_(summed)
    score = float(summed[0] / summed[1].clamp_min(1))
    return score if math.isfinite(score) else math.inf


def score_plans(model, plans: list[PruningPlan], batches: list[torch.Tensor]) -> list[float]:
    """KL of each plan's pruned model from the unpruned one on `batches` (this rank's share of them when
    calibrating across processes); the model is left unchanged. A model held layer by layer
    (`layerwise.LayerwiseModel`) is scored in one streamed pass over its layers."""
    mine = [batch for _, batch in distributed.shard(batches)]
    if hasattr(model, "score_plans"):
        totals = model.score_plans(plans, mine)
    else:
        totals = _score_in_memory(model, plans, mine)
    return [mean_kl_over_ranks(t) for t in totals]


@torch.no_grad()
def _score_in_memory(model, plans: list[PruningPlan], batches: list[torch.Tensor]) -> list[list[tuple[float, int]]]:
    _, layers = find_moe_layers(model)
    modules = [m for layer in layers for m in layer.block.modules()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        refs = [reference_of(model(input_ids=b.to(device), use_cache=False).logits) for b in batches]
        totals = []
        for plan in tqdm(plans, desc="GRAPE scoring plans", unit="plan", leave=False):
            with restored(modules):
                apply_clusters(model, plan)
                totals.append([kl_terms(model(input_ids=b.to(device), use_cache=False).logits, ref)
                               for b, ref in zip(batches, refs)])
    finally:
        model.train(was_training)
    return totals
