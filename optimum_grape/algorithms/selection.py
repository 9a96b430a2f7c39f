"""Choosing which experts to keep or group, per layer or across layers: pure functions on the
statistics tensors (scores, affinities, router logits, expert outputs)."""

from __future__ import annotations

import itertools
import math

import torch

from .budget import check_budget


def lowest_per_layer(scores: dict[int, torch.Tensor], removals: dict[int, int]) -> dict[int, list[int]]:
    """Per layer, keep all but the `removals[l]` lowest-scoring experts (ties: higher id removed first)."""
    kept = {}
    for layer, s in scores.items():
        order = sorted(range(len(s)), key=lambda e: (float(s[e]), -e))
        kept[layer] = sorted(order[removals[layer]:])
    return kept


def lowest_globally(scores: dict[int, torch.Tensor], floors: dict[int, int], budget: int) -> dict[int, list[int]]:
    """Remove the `budget` lowest scores model-wide (scores must be comparable across layers),
    skipping any expert whose removal would break its layer's floor."""
    check_budget({l: len(s) for l, s in scores.items()}, floors, budget)
    ranked = sorted(((float(s[e]), l, -e) for l, s in scores.items() for e in range(len(s))))
    left = {l: len(s) for l, s in scores.items()}
    removed: set[tuple[int, int]] = set()
    for _, layer, neg_e in ranked:
        if len(removed) == budget:
            break
        if left[layer] > floors[layer]:
            removed.add((layer, -neg_e))
            left[layer] -= 1
    return {l: [e for e in range(len(s)) if (l, e) not in removed] for l, s in scores.items()}


def share_of_layer(values: torch.Tensor) -> torch.Tensor:
    """Per-layer normalisation that makes scores comparable across layers: fraction of the layer's total."""
    total = float(values.sum())
    return values.double() / total if total > 0 else torch.full_like(values, 1.0 / len(values), dtype=torch.float64)


class AverageLinkage:
    """Agglomerative clustering state on an affinity matrix: join the two clusters with the highest
    affinity; the joined cluster's row is the size-weighted mean of the two (average linkage,
    C-Prune's update rule). Deterministic: ties go to the lowest ids."""

    def __init__(self, affinity: torch.Tensor) -> None:
        self.a = affinity.double().clone()
        self.clusters = [[i] for i in range(affinity.shape[0])]
        self.sizes = torch.ones(len(self.clusters), dtype=torch.float64)

    def best(self) -> tuple[float, int, int]:
        masked = self.a.clone().fill_diagonal_(-math.inf)
        u, v = divmod(int(torch.argmax(masked)), masked.shape[1])
        return float(masked[u, v]), min(u, v), max(u, v)

    def join(self, u: int, v: int) -> None:
        row = (self.sizes[u] * self.a[u] + self.sizes[v] * self.a[v]) / (self.sizes[u] + self.sizes[v])
        self.a[u], self.a[:, u] = row, row
        keep = [i for i in range(len(self.clusters)) if i != v]
        self.clusters[u] = sorted(self.clusters[u] + self.clusters[v])
        self.sizes[u] += self.sizes[v]
        self.clusters.pop(v)
        self.a, self.sizes = self.a[keep][:, keep], self.sizes[keep]

    def result(self) -> list[list[int]]:
        return sorted(self.clusters, key=lambda c: c[0])


def average_linkage(affinity: torch.Tensor, keep: int) -> list[list[int]]:
    state = AverageLinkage(affinity)
    while len(state.clusters) > keep:
        state.join(*state.best()[1:])
    return state.result()


def top_k_routing(logits: torch.Tensor, scoring: str, top_k: int, norm_topk_prob: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_weights, top_k_index) of [T, E] router logits: softmax or sigmoid scores, top-k,
    optional renormalisation (a RoutingSpec's rule). Computed in the logits' dtype."""
    scores = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    weights, index = scores.topk(min(top_k, logits.shape[-1]), dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return weights, index


def route(logits: torch.Tensor, routing: dict, subset: list[int] | None = None) -> torch.Tensor:
    """Dense routing weights [T, E] a layer would use if only `subset` experts existed (zeros
    elsewhere), following its RoutingSpec."""
    experts = list(range(logits.shape[1])) if subset is None else list(subset)
    sub = logits[:, experts].double()
    top_val, top_idx = top_k_routing(sub, routing.get("scoring", "softmax"), int(routing["top_k"]),
                                     routing.get("norm_topk_prob", True))
    dense = torch.zeros_like(logits, dtype=torch.float64)
    dense[:, experts] = torch.zeros_like(sub).scatter(1, top_idx, top_val)
    return dense


def count_subsets(num_experts: int, keep: int) -> int:
    return math.comb(num_experts, keep)


def best_subset(outputs: torch.Tensor, logits: torch.Tensor, routing: dict, keep: int) -> tuple[list[int], float]:
    """NAEE (Lu et al., ACL 2024): the size-`keep` subset whose re-routed layer output is closest
    (mean squared error) to the full layer's output on the same tokens. Exhaustive."""
    outputs = outputs.double()
    full = torch.einsum("te,eth->th", route(logits, routing), outputs)
    best, best_err = None, math.inf
    for subset in itertools.combinations(range(outputs.shape[0]), keep):
        approx = torch.einsum("te,eth->th", route(logits, routing, list(subset)), outputs)
        err = float(((approx - full) ** 2).sum(-1).mean())
        if err < best_err - 1e-12:
            best, best_err = list(subset), err
    return best, best_err


def router_guided_groups(router_logits: torch.Tensor, frequency: torch.Tensor, keep: int) -> list[list[int]]:
    """MC-SMoE grouping (Li et al., ICLR 2024): the `keep` most-routed experts are dominant; every
    other expert joins the dominant expert whose router-logit column is most similar (cosine over
    calibration tokens)."""
    order = sorted(range(len(frequency)), key=lambda e: (-float(frequency[e]), e))
    dominant = sorted(order[:keep])
    cols = torch.nn.functional.normalize(router_logits.double().T, dim=-1)
    sim = cols @ cols.T
    groups = {d: [d] for d in dominant}
    for e in order[keep:]:
        target = max(dominant, key=lambda d: (float(sim[e, d]), -d))
        groups[target].append(e)
    return [sorted(g) for g in groups.values()]
