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


SCORING = {"softmax": lambda z: torch.softmax(z, dim=-1), "sigmoid": torch.sigmoid,
           "sqrtsoftplus": lambda z: torch.sqrt(torch.nn.functional.softplus(z))}


def routing_choice(logits: torch.Tensor, scoring: str, choice_bias: torch.Tensor | None = None,
                   choice_on: str = "scores", n_group: int = 1, topk_group: int = 1, group_score: str = "top2"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, choice) of [T, E] router logits: the scores weight the chosen experts; the top-k of
    `choice` chooses them. `choice` is the scores (or the logits, `choice_on="logits"`) plus an optional
    per-expert `choice_bias` (a correction bias that balances load without changing the weights), and
    with `n_group > 1` only the best `topk_group` contiguous groups of experts stay eligible, a group
    scored by the sum of its top-2 choices (DeepSeek-V3) or its best one (`group_score="max"`, V2)."""
    scores = SCORING[scoring](logits)
    choice = scores if choice_on == "scores" else logits
    if choice_bias is not None:
        choice = choice + choice_bias.to(choice.dtype)
    if n_group > 1:
        grouped = choice.view(*choice.shape[:-1], n_group, -1)
        best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1) if group_score == "top2" \
            else grouped.max(dim=-1).values
        keep = torch.zeros_like(best, dtype=torch.bool).scatter(-1, best.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=-1), float("-inf"))
    return scores, choice


def top_k_routing(logits: torch.Tensor, scoring: str, top_k: int, norm_topk_prob: bool, **choice
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_weights, top_k_index) of [T, E] router logits: softmax, sigmoid or sqrt-softplus scores,
    top-k, optional renormalisation (a RoutingSpec's rule). `choice` takes `routing_choice`'s options
    (correction bias, groups) for routers that choose experts on other values than they weight them.
    Computed in the logits' dtype."""
    scores, chosen_on = routing_choice(logits, scoring, **choice)
    index = chosen_on.topk(min(top_k, logits.shape[-1]), dim=-1).indices
    weights = scores.gather(-1, index)
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
