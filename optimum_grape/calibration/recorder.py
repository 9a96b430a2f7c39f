"""Recording router statistics and expert outputs during a calibration pass.

The hook is an experts implementation registered with transformers' `ExpertsInterface`: every
`@use_experts_implementation` family then calls it with (experts, hidden_states, top_k_index,
top_k_weights), in every layer, without patching model code. The context manager switches the
model to it and always switches back.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..adapters import MoEAdapter, MoELayer
from ..algorithms.similarity import expert_similarity
from ..stats import LayerStats

IMPLEMENTATION_NAME = "grape_calibration"
_RECORDERS: dict[int, "LayerRecorder"] = {}  # id(experts module) -> recorder of the running pass


def _calibration_forward(experts, hidden_states, top_k_index, top_k_weights):
    recorder = _RECORDERS.get(id(experts))
    if recorder is None and _RECORDERS:  # experts the plan keeps whole (hash-routed, a vision tower's): run as usual
        return type(experts).forward.__wrapped__(experts, hidden_states, top_k_index, top_k_weights)
    if recorder is None:
        raise RuntimeError(
            f"{type(experts).__name__} called the '{IMPLEMENTATION_NAME}' experts implementation outside a "
            "calibration pass; call model.set_experts_implementation('eager') to reset it."
        )
    return recorder.forward(hidden_states, top_k_index, top_k_weights)


def _register_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if IMPLEMENTATION_NAME not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(IMPLEMENTATION_NAME, _calibration_forward)


class LayerRecorder:
    """Accumulates one layer's statistics (float64 sums on the data's device, as llm-compressor does)."""

    def __init__(self, adapter: MoEAdapter, layer: MoELayer, tokens_per_call: int, max_tokens: int,
                 seed: int) -> None:
        self.adapter, self.layer = adapter, layer
        n, device = layer.num_experts, layer.router_weight().device
        device = torch.device("cpu") if device.type == "meta" else device  # layer by layer: loaded later, on CPU
        self.tokens = torch.zeros(n, dtype=torch.float64, device=device)
        self.weight_mass = torch.zeros(n, dtype=torch.float64, device=device)
        self.saliency_sum = torch.zeros(n, dtype=torch.float64, device=device)
        # Largest |output| of each expert on its routed tokens: super experts (arXiv 2507.23279) show
        # rare, extreme outliers here.
        self.max_output = torch.zeros(n, dtype=torch.float64, device=device)
        self.tokens_per_call, self.max_tokens, self.seed = tokens_per_call, max_tokens, seed
        # Index of the calibration batch running now (set by the calibration loop): which tokens are
        # sampled depends on (seed, layer, batch) only, so a layer-by-layer or multi-process pass
        # samples exactly what one forward pass over all batches does.
        self.batch = 0
        self.closed = self.paused = False
        self.sample_keys: list[int] = []
        self.samples: list[torch.Tensor] = []
        self.sample_gates: list[torch.Tensor] = []  # [t, E] gates the router gave the sampled tokens

    def forward(self, hidden, top_k_index, top_k_weights):
        # Finalising, or verifying the adapter (layer by layer), runs the layer again: not calibration data.
        recording = not (self.closed or self.paused)
        out = torch.zeros_like(hidden)
        for e in torch.unique(top_k_index).tolist():
            tok, pos = torch.where(top_k_index == e)
            y = self.adapter.run_experts(self.layer, hidden[tok], [e])[0]
            w = top_k_weights[tok, pos]
            out.index_add_(0, tok, (y * w[:, None].to(y.dtype)).to(out.dtype))
            if recording:
                self.saliency_sum[e] += (w.double() * y.double().norm(dim=-1)).sum()
                self.max_output[e] = torch.maximum(self.max_output[e], y.detach().abs().max().double())
        if not recording:
            return out
        flat = top_k_index.flatten()
        self.tokens.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        self.weight_mass.index_add_(0, flat, top_k_weights.flatten().double())
        self._sample(hidden, top_k_index, top_k_weights)
        return out

    def _sample(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        # Batch b may add up to tokens_per_call samples while the first b batches' quotas leave room.
        quota = min(self.tokens_per_call, self.max_tokens - self.batch * self.tokens_per_call)
        take = min(quota, hidden.shape[0])
        if take <= 0:
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.layer.index * 65_537 + self.batch)
        rows = torch.randperm(hidden.shape[0], generator=generator)[:take].to(hidden.device)
        self.sample_keys.append(self.batch)
        self.samples.append(hidden[rows].detach().clone())
        gates = torch.zeros(take, self.layer.num_experts, dtype=torch.float32, device=hidden.device)
        gates.scatter_(1, top_k_index[rows].long(), top_k_weights[rows].detach().float())
        self.sample_gates.append(gates)

    @contextlib.contextmanager
    def pause(self):
        """Run the layer without recording (the adapter's check on sample tokens)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def reduce(self) -> None:
        """Make this rank's sums, maxima and samples those of every rank (a no-op in one process)."""
        from . import distributed

        for total in (self.tokens, self.weight_mass, self.saliency_sum):
            distributed.reduce_(total)
        distributed.reduce_(self.max_output, "max")
        keys = list(self.sample_keys)
        self.sample_keys, self.samples = distributed.gather_rows(keys, self.samples)
        _, self.sample_gates = distributed.gather_rows(keys, self.sample_gates)

    def finalize(self, needs: frozenset[str], similarity: str, config, floor: int) -> LayerStats:
        self.closed = True
        self.reduce()
        stats = LayerStats(
            num_experts=self.layer.num_experts, floor=floor,
            routing=self.adapter.routing_spec(self.layer, config).to_dict(),
            router_weight=self.layer.router_weight().detach().double().cpu(),
            tokens=self.tokens.cpu(), weight_mass=self.weight_mass.cpu(),
            saliency=(self.saliency_sum / self.tokens.clamp_min(1)).cpu(), max_output=self.max_output.cpu(),
        )
        if not needs or not self.samples:
            return stats
        sample = torch.cat(self.samples)
        if needs & {"similarity", "mean_output", "expert_outputs"}:
            outputs = self.adapter.run_experts(self.layer, sample, range(self.layer.num_experts)).float()
            if "similarity" in needs:
                stats.similarity = expert_similarity(outputs, similarity, torch.cat(self.sample_gates)).cpu()
            if "mean_output" in needs:
                stats.mean_output = outputs.mean(dim=1).double().cpu()
            if "expert_outputs" in needs:
                stats.expert_outputs = outputs.cpu()
        if "router_logits" in needs or "expert_outputs" in needs:
            stats.router_logits = self.adapter.router_logits(self.layer, sample).float().cpu()
        return stats


def set_batch(recorders: dict[int, LayerRecorder], index: int) -> None:
    """Tell every recorder which calibration batch (its index among all batches) runs next."""
    for recorder in recorders.values():
        recorder.batch = index


@contextlib.contextmanager
def recording(model, adapter: MoEAdapter, layers: list[MoELayer], num_batches: int, max_tokens: int, seed: int):
    """Route every MoE layer of `model` through recorders for the duration of the block."""
    _register_implementation()
    per_call = max(1, math.ceil(max_tokens / max(1, num_batches)))
    recorders = {layer.index: LayerRecorder(adapter, layer, per_call, max_tokens, seed) for layer in layers}
    if adapter.calibration == "hooks":  # experts outside ExpertsInterface (nn.ModuleList layout)
        from .hooks import router_hooks

        with router_hooks(model, adapter, layers, recorders):
            yield recorders
        return
    previous = model.config._experts_implementation
    for layer in layers:
        _RECORDERS[id(layer.experts)] = recorders[layer.index]
    try:
        model.set_experts_implementation(IMPLEMENTATION_NAME)
        yield recorders
    finally:
        for layer in layers:
            _RECORDERS.pop(id(layer.experts), None)
        model.set_experts_implementation(previous)
