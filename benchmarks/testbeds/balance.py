"""Routing balance of an MoE: the per-layer load-balancing loss the testbeds are trained with, and
the realism figures every results file records (normalised routing entropy, smallest expert share).

Why per layer: transformers' `load_balancing_loss_func` concatenates the router logits of all layers
before computing tokens-per-expert, so expert e's load is averaged over layers and one layer can
collapse while another compensates (the first shipped model did exactly that: 10 of 48 experts
under 1% of their layer's routings). The Switch/GShard loss applied to each layer on its own
penalises every layer's imbalance. We chose it over DeepSeek-V3's auxiliary-loss-free bias update
because that needs a per-expert bias in the router, which the Mixtral and Qwen2-MoE architectures
do not have: the trained model would not load as the architecture it claims to be.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_layer_balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Mean over layers of E * sum_i f_i P_i (Switch Transformer, Fedus et al. 2021), where f_i is
    the share of layer's top-k routing slots that go to expert i and P_i its mean router
    probability. Equals 1 for perfectly balanced routing in every layer, E for a collapsed layer."""
    losses = []
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1]).float()
        probs = F.softmax(logits, dim=-1)
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        share = F.one_hot(chosen, num_experts).float().sum(dim=1).mean(dim=0) / top_k
        losses.append(num_experts * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def routing_balance(counts: torch.Tensor) -> dict:
    """Realism figures of routing counts [E] of one layer (top-k choices per expert)."""
    share = counts.double() / counts.double().sum().clamp_min(1)
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum()) / math.log(share.numel())
    return {"normalised_entropy": round(entropy, 4), "min_share": round(float(share.min()), 5),
            "max_share": round(float(share.max()), 5)}


def balance_report(counts_per_layer: dict[int, torch.Tensor]) -> dict:
    """Per-layer figures plus the model-wide worst case, against the targets of the testbeds issue:
    every expert of every layer takes at least 1/(4E) of its layer's routings, and the normalised
    entropy of every layer is at least 0.95."""
    layers = {str(l): routing_balance(c) for l, c in sorted(counts_per_layer.items())}
    num_experts = max(int(c.numel()) for c in counts_per_layer.values())
    worst_share = min(v["min_share"] for v in layers.values())
    worst_entropy = min(v["normalised_entropy"] for v in layers.values())
    target_share = 1 / (4 * num_experts)
    return {"layers": layers, "min_share": worst_share, "min_normalised_entropy": worst_entropy,
            "target_min_share": round(target_share, 5), "target_min_entropy": 0.95,
            "meets_targets": worst_share >= target_share and worst_entropy >= 0.95}
