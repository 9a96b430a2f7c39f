"""Choosing between candidate plans end to end, as EvoESAP (arXiv 2603.06003) does for allocations:
each candidate is applied to the model in place, scored by how far its next-token distribution
moves from the unpruned model's on held-aside calibration tokens, and undone; the pruner keeps the
lowest score. The uniform allocation is always a candidate, so the choice is never worse than
uniform on these tokens.

Score: KL(unpruned || pruned) per token, over the unpruned model's top-`TOP` tokens plus one bucket
for the rest of the vocabulary. That is the exact KL of the two distributions coarsened to TOP + 1
outcomes (a lower bound of the full KL), and keeps the reference small for any vocabulary.

Scoring streams the decoder one layer at a time (`calibration/stream.py`): the unpruned states and
one set of states per plan move through the layers together, and a plan's clusters are applied to
a layer only while that layer runs, then undone. Only one layer's merged experts exist at a time
(applying a plan to the whole model would hold a second copy of most experts), and a plan that
changes only late layers shares the unpruned states up to there (the per-layer sensitivity probe
costs half the layer passes of one forward per plan). Each layer runs the operations of the full
forward on the same inputs, so the scores are those of full forwards; a model that cannot be run
layer by layer (a decoder layer called twice, no `layers` list, layers passing more than their
states: `check_streams_like_forward`) is scored with full forwards.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from transformers.utils.logging import tqdm  # honours disable_progress_bar() and HF_HUB_DISABLE_PROGRESS_BARS

from ..adapters import find_moe_layers
from ..calibration import distributed
from ..calibration.stream import capture, check_streams_like_forward, decoder_layers, head_logits, run_layer
from ..errors import UnsupportedModelError
from ..merging.apply import Snapshot, apply_clusters
from ..runtime.memory import return_free_memory
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
def stream_scores(module, layers, found, plans: list[PruningPlan], batches: list[torch.Tensor], visit=None
                  ) -> list[list[tuple[float, int]]]:
    """Per plan, the KL terms of each batch, in one streamed pass over the decoder `layers` of `module`
    (see the module docstring). `found`: the (adapter, MoE layers) of `module`; `visit(order)` yields
    the layer indices in `order` with each layer ready to run (layer-by-layer mode loads it there)."""
    adapter, moe = found[0], {layer.index: layer for layer in found[1]}
    captured = capture(module, layers, batches)
    reference, variants = captured.inputs, [None] * len(plans)  # None: not changed by its plan yet
    for i in (visit or iter)(captured.order):
        if i not in captured.order:
            continue
        before = reference
        reference = run_layer(layers, i, captured, before)
        for v, plan in enumerate(plans):
            if i in plan.clusters:
                snapshot = Snapshot(list(moe[i].block.modules()))
                try:
                    apply_clusters(module, plan.restricted_to([i]), found=found)
                    variants[v] = run_layer(layers, i, captured, variants[v] or before)
                finally:
                    snapshot.restore()
                    del snapshot  # it holds the layer's tensors: freeing the layer must free them
                    return_free_memory()  # the candidate's merged tensors, gone: hand them back now
            elif variants[v] is not None:
                variants[v] = run_layer(layers, i, captured, variants[v])
    totals = [[] for _ in plans]
    for b in range(len(batches)):
        ref = reference_of(head_logits(module, layers, captured, b, reference[b]))
        for v, states in enumerate(variants):
            logits = head_logits(module, layers, captured, b, (states or reference)[b])
            totals[v].append(kl_terms(logits, ref))
    return totals


@torch.no_grad()
def _score_in_memory(model, plans: list[PruningPlan], batches: list[torch.Tensor]) -> list[list[tuple[float, int]]]:
    was_training = model.training
    model.eval()
    try:
        try:
            _, layers = decoder_layers(model)
            if batches:
                check_streams_like_forward(model, layers, batches[0][:1])  # one sequence settles it
            return stream_scores(model, layers, find_moe_layers(model), plans, batches,
                                 lambda order: tqdm(order, desc="GRAPE scoring plans", unit="layer", leave=False))
        except UnsupportedModelError as err:
            logger.info("GRAPE: scoring plans with full forwards (%s)", str(err).split(";")[0])
            return _score_with_full_forwards(model, plans, batches)
    finally:
        model.train(was_training)


@torch.no_grad()
def _score_with_full_forwards(model, plans: list[PruningPlan], batches: list[torch.Tensor]
                              ) -> list[list[tuple[float, int]]]:
    _, layers = find_moe_layers(model)
    modules = [m for layer in layers for m in layer.block.modules()]
    device = next(model.parameters()).device
    refs = [reference_of(model(input_ids=b.to(device), use_cache=False).logits) for b in batches]
    totals = []
    for plan in tqdm(plans, desc="GRAPE scoring plans", unit="plan", leave=False):
        with restored(modules):
            apply_clusters(model, plan)
            totals.append([kl_terms(model(input_ids=b.to(device), use_cache=False).logits, ref)
                           for b, ref in zip(batches, refs)])
    return totals
