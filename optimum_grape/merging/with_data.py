"""Merging with calibration data, one MoE layer at a time, in model order (REAM, arXiv 2604.04356):

- the layer's inputs are collected from the model AS IT IS NOW, so a layer is merged on the hidden
  states its already-merged predecessors produce (sequential recalibration); they are carried
  forward one decoder layer at a time (`StreamedInputs`), so merging a model of L layers runs L
  layer passes, not the L(L+1)/2 of a forward up to each layer;
- with `sequential`, the layer's clusters are planned again on those inputs (same expert count,
  the method's own per-layer rule: `PruningMethod.replan_layer`);
- members are aligned to their representative on their activations as well as their weights;
- with `refit`, each merged expert's down projection is refitted by ridge least squares so that, on
  the tokens the new router sends it, its output matches what its members contributed before
  (a fit is kept only if it lowers the error on tokens held out of the fit).

Needs experts an adapter can expose (`MoEAdapter.merges_with_data`); others are merged as usual.
"""

from __future__ import annotations

import logging

import torch

from ..adapters import MoEAdapter, MoELayer
from ..algorithms.merging import cluster_weights
from ..calibration.stream import capture, check_streams_like_forward, decoder_layers, experts_inputs, run_layer
from ..errors import UnsupportedModelError

logger = logging.getLogger("optimum_grape")


class _StopAtLayer(Exception):
    """Raised by a capture hook to stop the forward pass once what it wanted is recorded."""


def _experts_call(args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [N, H], top_k_index [N, k], top_k_weights [N, k]) of a call into fused experts."""
    values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
    hidden, index, weights = values[:3]
    return hidden.reshape(-1, hidden.shape[-1]).detach(), index.reshape(hidden.shape[0], -1), \
        weights.reshape(hidden.shape[0], -1).detach()


@torch.no_grad()
def layer_inputs(model, layer: MoELayer, batches: list[torch.Tensor], max_tokens: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the layer's experts receive on the calibration batches, through the model as it is now:
    their inputs [N, H] (at most `max_tokens`, sampled with `seed`) and the gates [N, E] the layer's
    own router gave them (group limits and correction biases included). Each forward stops there."""
    device = next(model.parameters()).device
    calls = []

    def hook(module, args, kwargs):
        calls.append((args, kwargs))
        raise _StopAtLayer

    handle = layer.experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopAtLayer:
                pass
    finally:
        handle.remove()
    return assemble_inputs(layer, calls, max_tokens, seed)


class StreamedInputs:
    """`layer_inputs` for MoE layers asked in model order, carried forward: the calibration states
    wait at the input of the last layer asked for, and reaching a later layer runs only the decoder
    layers in between, as they are now (merged). Asking again for the same layer (after merging it, to
    refit) re-runs only that layer's block up to its experts."""

    def __init__(self, model, batches: list[torch.Tensor], max_tokens: int, seed: int) -> None:
        _, self.layers = decoder_layers(model)
        check_streams_like_forward(model, self.layers, batches[0][:1])
        self.captured = capture(model, self.layers, batches)
        self.max_tokens, self.seed = max_tokens, seed
        self.position, self.states = 0, self.captured.inputs  # states entering captured.order[position]

    def __call__(self, layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.captured.order
        if layer.index not in order[self.position:]:
            raise UnsupportedModelError(f"MoE layer {layer.index} was asked for after the layers that follow it "
                                        "in the model's forward")
        while order[self.position] != layer.index:
            self.states = run_layer(self.layers, order[self.position], self.captured, self.states)
            self.position += 1
        calls = experts_inputs(self.layers, layer.index, layer.experts, self.captured, self.states)
        return assemble_inputs(layer, calls, self.max_tokens, self.seed)


def assemble_inputs(layer: MoELayer, calls: list[tuple], max_tokens: int, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [N, H], gates [N, E]) from the (args, kwargs) of calls into the layer's experts, at most
    `max_tokens` rows sampled with `seed` (`layer_inputs`; layer-by-layer mode collects the calls itself)."""
    calls = [_experts_call(args, kwargs) for args, kwargs in calls]
    hidden = torch.cat([c[0] for c in calls])
    gates = torch.zeros(hidden.shape[0], layer.num_experts, dtype=torch.float64, device=hidden.device)
    gates.scatter_(1, torch.cat([c[1] for c in calls]).long(), torch.cat([c[2] for c in calls]).double())
    if hidden.shape[0] > max_tokens:
        rows = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
        rows = rows.sort().values.to(hidden.device)
        hidden, gates = hidden[rows], gates[rows]
    return hidden, gates


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
                 max_tokens: int = 8192, seed: int = 0, ridge: float = 1e-2, inputs_of=None) -> None:
        self.refit, self.replan = refit, replan
        self.max_tokens, self.seed, self.ridge = max_tokens, seed, ridge
        # layer -> (inputs, gates) on the calibration batches through the model as it is now; layer-by-
        # layer mode passes its own (the streamed states of its pass).
        self.inputs_of = inputs_of or self._default_inputs(model, batches, max_tokens, seed)
        self.report: dict[str, dict] = {}

    @staticmethod
    def _default_inputs(model, batches, max_tokens, seed):
        """Carried forward layer by layer (`StreamedInputs`); a model whose decoder cannot be run one
        layer at a time gets a forward up to each layer (`layer_inputs`)."""
        full = lambda layer: layer_inputs(model, layer, batches, max_tokens, seed)  # noqa: E731
        if model is None:
            return full
        state = {}

        def inputs_of(layer):
            if state.get("fallback"):
                return full(layer)
            try:
                if "streamed" not in state:
                    state["streamed"] = StreamedInputs(model, batches, max_tokens, seed)
                return state["streamed"](layer)
            except UnsupportedModelError as err:
                logger.info("GRAPE: merging inputs from a forward per layer (%s)", str(err).split(";")[0])
                state["fallback"] = True
                return full(layer)

        return inputs_of

    def __call__(self, adapter: MoEAdapter, layer: MoELayer, clusters, weights, routers, align: bool):
        """Merge `layer`; returns the clusters and merge weights actually used (re-planned or not)."""
        x, before = self.inputs_of(layer)
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
        # The same tokens (same seed) as they reach the merged layer: what its new router now does.
        x, after = self.inputs_of(layer)
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
    from ..algorithms.merging import router_weights

    counts = (gates > 0).double().sum(0)
    return cluster_weights(clusters, counts, mode), router_weights(clusters, routers_mode)
