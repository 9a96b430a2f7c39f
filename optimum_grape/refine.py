"""Merging with calibration data, one MoE layer at a time, in model order (REAM, arXiv 2604.04356):

- the layer's inputs are collected from the model AS IT IS NOW, so a layer is merged on the hidden
  states its already-merged predecessors produce (sequential recalibration);
- with `sequential`, the layer's clusters are planned again on those inputs (same expert count,
  the method's own per-layer rule: `PruningMethod.replan_layer`);
- members are aligned to their representative on their activations as well as their weights;
- with `refit`, each merged expert's down projection is refitted by ridge least squares so that, on
  the tokens the new router sends it, its output matches what its members contributed before
  (a fit is kept only if it lowers the error on tokens held out of the fit).

Needs experts an adapter can expose (`MoEAdapter.supports_refit`); others are merged as usual.
"""

from __future__ import annotations

import logging

import torch

from .adapters import MoEAdapter, MoELayer
from .algorithms.merging import cluster_weights

logger = logging.getLogger("optimum_grape")


class _Captured(Exception):
    """Raised by a capture hook to stop the forward pass once what it wanted is recorded."""


def _capture(module, batches_fn, with_kwargs: bool, pick):
    out = []

    def hook(mod, args, kwargs=None):
        out.append(pick(args, kwargs or {}))
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    try:
        for call in batches_fn():
            try:
                call()
            except _Captured:
                pass
    finally:
        handle.remove()
    return out


@torch.no_grad()
def layer_inputs(model, layer: MoELayer, batches: list[torch.Tensor], max_tokens: int, seed: int) -> torch.Tensor:
    """[N, H] inputs of the sparse block on the calibration batches (at most `max_tokens`, sampled
    with `seed`), through the model as it is now; the forward stops at the block."""
    device = next(model.parameters()).device

    def calls():
        return [lambda b=b: model(input_ids=b.to(device), use_cache=False) for b in batches]

    parts = _capture(layer.block, calls, False, lambda args, kw: args[0].reshape(-1, args[0].shape[-1]).detach())
    hidden = torch.cat(parts)
    if hidden.shape[0] > max_tokens:
        rows = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
        hidden = hidden[rows.sort().values.to(hidden.device)]
    return hidden


@torch.no_grad()
def routing_gates(layer: MoELayer, hidden: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E] gates the block's own router gives `hidden` (exactly as in the model: group limits and
    correction biases included), read from the call into its experts."""
    def pick(args, kwargs):
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        return values[1], values[2]

    ((index, weights),) = _capture(layer.experts, lambda: [lambda: layer.block(hidden[None])], True, pick)
    gates = torch.zeros(hidden.shape[0], num_experts, dtype=torch.float64, device=hidden.device)
    return gates.scatter_(1, index.reshape(hidden.shape[0], -1).long(),
                          weights.reshape(hidden.shape[0], -1).double())


def ridge_down_projection(acts: torch.Tensor, gates: torch.Tensor, target: torch.Tensor, ridge: float
                          ) -> torch.Tensor:
    """W [H, I] minimising sum_t ||gate_t W acts_t - target_t||^2 + ridge * mean(diag) * ||W||^2."""
    a = (gates[:, None] * acts).double()
    gram = a.T @ a
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                              a.T @ target.double()).T


class DataMerger:
    """Applies a plan's clusters layer by layer with calibration data (see the module docstring)."""

    def __init__(self, model, batches: list[torch.Tensor], *, refit: bool = False, replan=None,
                 max_tokens: int = 8192, seed: int = 0, ridge: float = 1e-2) -> None:
        self.model, self.batches = model, batches
        self.refit, self.replan = refit, replan
        self.max_tokens, self.seed, self.ridge = max_tokens, seed, ridge
        self.report: dict[str, dict] = {}

    def __call__(self, adapter: MoEAdapter, layer: MoELayer, clusters, weights, routers, align: bool):
        """Merge `layer`; returns the clusters and merge weights actually used (re-planned or not)."""
        x = layer_inputs(self.model, layer, self.batches, self.max_tokens, self.seed)
        before = routing_gates(layer, x, layer.num_experts)
        report = {"tokens": int(x.shape[0])}
        if self.replan is not None:
            clusters, weights, routers = self.replan(layer.index, adapter, layer, x, before)
            report["replanned"] = True
        targets = self._targets(adapter, layer, x, before, clusters) if self.refit else {}
        adapter.apply_clusters(layer, clusters, weights, routers, align, inputs=x)
        if targets:
            report["refit"] = self._refit(adapter, layer, x, targets)
        self.report[str(layer.index)] = report
        return clusters, weights

    @staticmethod
    def _targets(adapter, layer, x, gates, clusters) -> dict[int, torch.Tensor]:
        """Per merged cluster (by new index): what its members added to the layer output on each token."""
        out = {}
        for c, members in enumerate(clusters):
            if len(members) > 1:
                outputs = adapter.run_experts(layer, x, members).double()  # [m, N, H]
                out[c] = torch.einsum("mn,mnh->nh", gates[:, members].T, outputs)
        return out

    def _refit(self, adapter, layer, x, targets) -> dict:
        after = routing_gates(layer, x, layer.num_experts)
        kept = 0
        for c, target in targets.items():
            rows = torch.nonzero(after[:, c] > 0).flatten()
            acts = adapter.expert_activations(layer, x[rows], c).double()
            if rows.numel() < 2 * acts.shape[1]:
                continue  # too few tokens to fit an [H, I] matrix without overfitting
            check = torch.arange(rows.numel(), device=rows.device) % 5 == 0  # every fifth token checks the fit
            g, y = after[rows, c], target[rows]
            w = ridge_down_projection(acts[~check], g[~check], y[~check], self.ridge)
            current = adapter.run_experts(layer, x[rows][check], [c])[0].double()
            old_err = float(((g[check, None] * current - y[check]) ** 2).sum())
            new_err = float(((g[check, None] * (acts[check] @ w.T) - y[check]) ** 2).sum())
            if new_err < old_err:
                adapter.set_down_projection(layer, c, w.to(x.dtype))
                kept += 1
        return {"clusters": len(targets), "refitted": kept}


def replan_weights(clusters, gates: torch.Tensor, mode: str, routers_mode: str):
    """Merge weights of re-planned clusters from the routing counts on the layer's current inputs."""
    from .algorithms.merging import router_weights

    counts = (gates > 0).double().sum(0)
    return cluster_weights(clusters, counts, mode), router_weights(clusters, routers_mode)
