"""GRAPE's global redundancy-aware allocation (arXiv 2604.06542, Algorithm 1) and its per-layer
twin, as pure functions on similarity matrices.

Gaps the paper leaves, closed as docs/methods.md ("GRAPE") records: (a) the pair's similarity is subtracted from
R^l before it is cleared; (b) a pair already joined transitively is cleared and subtracted but is
not a merge (union-find per layer); (c) no layer goes below its floor; (d) we stay in similarity
form (argmax), and "clearing" retires the pair, so negative similarities (MSE) cannot be picked twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import BudgetError
from .budget import check_budget


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> bool:
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return False
        self.parent[max(ri, rj)] = min(ri, rj)
        return True

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return sorted(out.values(), key=lambda g: g[0])


class _LayerState:
    """Residual similarity of one layer: R^l, clusters, and its pairs in the order they are processed.

    Clearing a processed pair never changes the other entries, so "the most similar open pair" is
    simply the next pair in one descending sort of the upper triangle (a stable sort keeps argmax's
    row-major tie-breaking). This makes each step O(1) instead of a scan of the E x E matrix.

    `protected` experts (super experts) are never merged: a pair that touches one is cleared and
    subtracted like a pair already joined, without merging.
    """

    def __init__(self, sim: torch.Tensor, protected: frozenset[int] = frozenset()) -> None:
        n = sim.shape[0]
        sim = sim.double()
        rows, cols = torch.triu_indices(n, n, offset=1)
        values = sim[rows, cols]
        order = torch.sort(values, descending=True, stable=True).indices
        self.pairs = list(zip(rows[order].tolist(), cols[order].tolist(), values[order].tolist()))
        self.next = 0
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        self.redundancy = float(sim[off_diagonal].sum())  # R^l = sum_{i != j} D_ij (Eq. 11)
        self.uf = UnionFind(n)
        self.count = n
        self.protected = protected
        self.costly_merges = 0  # merges that count against a layer cap (`grape_global_merge(free_above=...)`)
        self._peeked: tuple[int, int, float | None] | None = None

    @property
    def exhausted(self) -> bool:
        return self.next >= len(self.pairs)

    def step(self) -> tuple[int, int, float, bool]:
        """Process the most similar open pair; returns (i, j, s, merged)."""
        i, j, s = self.pairs[self.next]
        self.next += 1
        self.redundancy -= 2 * s  # gap (a): subtract before clearing (D_ij and D_ji)
        merged = i not in self.protected and j not in self.protected and self.uf.union(i, j)
        if merged:
            self.count -= 1
        return i, j, s, merged

    def next_merge_similarity(self) -> float | None:
        """Similarity of the pair `merge_once` would merge next (None when none is left), without
        processing anything. Cached until the state moves on."""
        key = (self.next, self.count)
        if self._peeked is None or self._peeked[:2] != key:
            found = None
            for i, j, s in self.pairs[self.next:]:
                if i not in self.protected and j not in self.protected and self.uf.find(i) != self.uf.find(j):
                    found = s
                    break
            self._peeked = (*key, found)
        return self._peeked[2]

    def merge_once(self) -> tuple[int, int, float] | None:
        """Process pairs until one merges; None if every pair is spent (only protected ones left)."""
        while not self.exhausted:
            i, j, s, merged = self.step()
            if merged:
                return i, j, s
        return None


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0)


@dataclass
class GlobalAllocation:
    clusters: dict[int, list[list[int]]]
    restarts: int = 0
    entropy_before: float = 0.0
    entropy_after: float = 0.0
    entropy_threshold: float = 0.0
    merge_order: list[tuple[int, int, int, float]] = field(default_factory=list)  # (layer, i, j, s)


def grape_global_merge(similarities: dict[int, torch.Tensor], floors: dict[int, int], budget: int,
                       entropy_tolerance: float, groups: dict[int, tuple[int, int]] | None = None,
                       caps: dict[int, int] | None = None, protected: dict[int, set[int]] | None = None,
                       free_above: float | None = None) -> GlobalAllocation:
    """Algorithm 1: spend one global budget of merges where layer redundancy R^l is highest.

    A layer whose merge drops the allocation entropy below E_0 (1 - gamma) is frozen; when every
    mergeable layer is frozen, all are unfrozen (restart). Deterministic: ties go to the lowest
    layer index and the lowest (i, j).

    `caps[l]` bounds how many experts layer l may lose (the paper has no such bound; without it a
    few very redundant layers can absorb the whole budget). A merge whose similarity is at least
    `free_above` (a merge that costs nothing: exact or near copies) is made before any other, in
    whichever layer it is, and does not count against the cap: neither the cap nor the redundancy
    ranking ever forces a costly merge while a free one is left. `protected[l]` are experts never
    merged.

    `groups[l] = (n_group, min_grouped)` marks a group-limited router (DeepSeek-V3): such a layer,
    once chosen, merges n_group pairs at once so its count stays a multiple of n_group, and not below
    min_grouped. Only when no layer can take such a step within the remaining budget do single
    merges continue (the layers they touch fall back to ungrouped routing when applied).
    """
    num_experts = {l: s.shape[0] for l, s in similarities.items()}
    caps = {l: min(caps.get(l, n), n - floors[l]) if caps else n - floors[l] for l, n in num_experts.items()}
    check_budget(num_experts, floors, budget)
    protected = protected or {}
    states = {l: _LayerState(similarities[l], frozenset(protected.get(l, ()))) for l in sorted(similarities)}
    entropy_before = _entropy(list(num_experts.values()))
    threshold = entropy_before * (1 - entropy_tolerance)
    frozen: set[int] = set()
    result = GlobalAllocation(clusters={}, entropy_before=entropy_before, entropy_threshold=threshold)
    groups = groups or {}

    def room(l: int) -> int:
        """Merges layer l may still make: its cap (free merges aside), and nothing once its pairs are spent."""
        state = states[l]
        upcoming = state.next_merge_similarity()
        if upcoming is None:
            return 0
        if free_above is not None and upcoming >= free_above:
            return state.count - floors[l]
        return max(0, min(caps[l] - state.costly_merges, state.count - floors[l]))

    def step_of(l: int, merges_left: int) -> int:
        """Merges one selection of layer l makes: n_group for a grouped layer that can stay grouped."""
        size, least = groups.get(l, (1, 0))
        if size > 1 and states[l].count % size == 0 and states[l].count - size >= max(least, floors[l]) \
                and size <= min(merges_left, room(l)):
            return size
        return 0 if size > 1 else (1 if room(l) > 0 else 0)

    merges_left = budget
    while merges_left > 0:
        steps = {l: step_of(l, merges_left) for l in states}
        mergeable = [l for l in states if steps[l]]
        if not mergeable:  # no grouped step fits: single merges, the touched layers will fall back
            steps = {l: 1 for l in states if room(l) > 0}
            mergeable = list(steps)
        if not mergeable:
            raise BudgetError(f"GRAPE could merge only {budget - merges_left} of {budget} experts: every other pair "
                              "touches a protected (super) expert or a layer at its cap. Lower the budget, raise "
                              "layer_cap or set protect_super_experts=False.")
        free = [l for l in mergeable if free_above is not None
                and (states[l].next_merge_similarity() or float("-inf")) >= free_above]
        if free:  # a merge that costs nothing is spent first, wherever it is, whatever the redundancy
            layer = max(free, key=lambda l: (states[l].next_merge_similarity(), -l))
        else:
            candidates = [l for l in mergeable if l not in frozen]
            if not candidates:
                frozen.clear()
                result.restarts += 1
                candidates = mergeable
            layer = max(candidates, key=lambda l: (states[l].redundancy, -l))
        target = states[layer].count - steps[layer]
        while states[layer].count > target:
            merge = states[layer].merge_once()
            if merge is None:
                break
            if free_above is None or merge[2] < free_above:
                states[layer].costly_merges += 1
            merges_left -= 1
            result.merge_order.append((layer, *merge))
        if _entropy([st.count for st in states.values()]) < threshold:
            frozen.add(layer)
    result.entropy_after = _entropy([st.count for st in states.values()])
    result.clusters = {l: st.uf.groups() for l, st in states.items()}
    return result


def greedy_merge_to(sim: torch.Tensor, keep: int, protected: set[int] | frozenset[int] = frozenset()
                    ) -> list[list[int]]:
    """Per-layer twin of Algorithm 1: merge the most similar open pair until `keep` clusters remain."""
    return greedy_merges(sim, sim.shape[0] - keep, protected)[0]


def greedy_merges(sim: torch.Tensor, merges: int, protected: set[int] | frozenset[int] = frozenset()
                  ) -> tuple[list[list[int]], list[float]]:
    """The clusters after `merges` greedy merges, and the similarity of each merged pair."""
    state = _LayerState(sim, frozenset(protected))
    merged = []
    while state.count > sim.shape[0] - merges:
        step = state.merge_once()
        if step is None:
            raise BudgetError(f"Cannot merge down to {sim.shape[0] - merges} experts without merging a protected "
                              f"(super) expert {sorted(protected)}; lower the budget or set "
                              "protect_super_experts=False.")
        merged.append(step[2])
    return state.uf.groups(), merged
