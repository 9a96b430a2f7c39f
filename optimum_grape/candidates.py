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

from .adapters import find_moe_layers
from .apply import Snapshot, apply_clusters
from .plan import PruningPlan

logger = logging.getLogger("optimum_grape")
TOP = 256


@contextlib.contextmanager
def restored(modules):
    """Undo every change to `modules` on exit (`apply.Snapshot`: attributes, parameters, buffers,
    submodules and each parameter's tensor as they were)."""
    snapshot = Snapshot(modules)
    try:
        yield
    finally:
        snapshot.restore()


@torch.no_grad()
def reference(model, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, the unpruned model's top-TOP token ids and their log-probabilities (+ the tail's)."""
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        logp = torch.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits.float(), dim=-1)
        top = logp.topk(min(TOP, logp.shape[-1]), dim=-1)
        out.append((top.indices, _with_tail(top.values)))
    return out


def _with_tail(top_logp: torch.Tensor) -> torch.Tensor:
    """Append log(1 - sum of the top probabilities) as one more outcome."""
    tail = torch.log1p(-top_logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    return torch.cat([top_logp, tail], dim=-1)


@torch.no_grad()
def kl_to_reference(model, batches: list[torch.Tensor], ref) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch, (index, ref_logp) in zip(batches, ref):
        logp = torch.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits.float(), dim=-1)
        new = _with_tail(logp.gather(-1, index))
        total += float((ref_logp.exp() * (ref_logp - new)).sum(-1).sum())
        count += ref_logp.shape[0] * ref_logp.shape[1]
    return total / max(count, 1)


def score_plans(model, plans: list[PruningPlan], batches: list[torch.Tensor]) -> list[float]:
    """KL of each plan's pruned model from the unpruned one on `batches`; the model is left unchanged."""
    _, layers = find_moe_layers(model)
    modules = [m for layer in layers for m in layer.block.modules()]
    was_training = model.training
    model.eval()
    try:
        ref = reference(model, batches)
        scores = []
        for plan in plans:
            with restored(modules):
                apply_clusters(model, plan)
                score = kl_to_reference(model, batches, ref)
            scores.append(score if math.isfinite(score) else math.inf)
            logger.info("  candidate %-10s KL %.5f  kept %s", plan.metadata.get("candidate", "?"), score,
                        list(plan.experts_per_layer.values()))
    finally:
        model.train(was_training)
    return scores
