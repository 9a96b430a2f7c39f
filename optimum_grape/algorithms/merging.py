"""Turning clusters of experts into single experts: pure tensor functions.

A cluster is a list of original expert ids, representative first. Merging is a weighted average
of the members' parameters along the expert dimension (MC-SMoE / HC-SMoE style); dropping is the
same average with all weight on the representative.
"""

from __future__ import annotations

import torch


# How a merged expert's router row is formed: the representative's row, or the mean of the cluster's rows.
ROUTER_MODES = ("representative", "mean")


def cluster_weights(clusters: list[list[int]], frequency: torch.Tensor | None, mode: str) -> list[list[float]]:
    """Per-cluster merge weights that sum to one.

    `weighted`: proportional to routing frequency (uniform inside a cluster nobody routed to);
    `drop`: one-hot on the representative; `mean`: uniform.
    """
    result = []
    for members in clusters:
        if mode == "drop" or len(members) == 1:
            result.append([1.0] + [0.0] * (len(members) - 1))
            continue
        mass = frequency[members].double() if (mode == "weighted" and frequency is not None) else None
        if mass is None or float(mass.sum()) <= 0:
            mass = torch.ones(len(members), dtype=torch.float64)
        result.append((mass / mass.sum()).tolist())
    return result


def router_weights(clusters: list[list[int]], mode: str) -> list[list[float]]:
    """How each kept router row is formed: the representative's row, or the mean of the members' rows."""
    return cluster_weights(clusters, None, "mean" if mode == "mean" else "drop")


def combine_rows(tensor: torch.Tensor, clusters: list[list[int]], weights: list[list[float]],
                 replaced: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """New tensor whose row c is sum_i weights[c][i] * row(clusters[c][i]) (dim 0 = experts), where
    row(m) is `replaced[m]` when given (e.g. a member with its neurons aligned) and `tensor[m]` otherwise.

    Singleton clusters and one-hot weights copy rows exactly, so keeping every expert is the identity.
    Each row is written straight into the result: besides it, only one cluster's members are held at
    a time, which is what keeps merging a layer of a large model within one extra copy of the output.
    """
    replaced = replaced or {}

    def row(m: int) -> torch.Tensor:
        return replaced.get(m, tensor[m])

    out = torch.empty((len(clusters), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    for c, (members, w) in enumerate(zip(clusters, weights)):
        nonzero = [(m, x) for m, x in zip(members, w) if x != 0.0]
        if len(nonzero) == 1 and nonzero[0][1] == 1.0:
            out[c].copy_(row(nonzero[0][0]))
            continue
        merged = torch.zeros(tensor.shape[1:], dtype=torch.float64, device=tensor.device)
        for m, x in nonzero:  # the same sum, in float64, one member at a time
            merged.add_(row(m).double(), alpha=x)
        out[c].copy_(merged)
    return out


def order_clusters(clusters: list[list[int]], priority: torch.Tensor | None) -> list[list[int]]:
    """Representative first (highest priority, e.g. tokens routed; ties to the lowest id), clusters
    sorted by their representative's original id so kept experts stay in their original order."""
    ordered = []
    for members in clusters:
        members = sorted(members)
        if priority is not None and len(members) > 1:
            rep = max(members, key=lambda m: (float(priority[m]), -m))
            members = [rep] + [m for m in members if m != rep]
        ordered.append(members)
    return sorted(ordered, key=lambda c: c[0])
