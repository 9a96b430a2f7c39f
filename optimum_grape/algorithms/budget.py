"""Budgets and per-layer floors: how many experts each layer may lose. Pure functions on ints."""

from __future__ import annotations

from ..errors import BudgetError


def check_budget(num_experts: dict[int, int], floors: dict[int, int], budget: int) -> None:
    """Refuse a budget that cannot be met without breaking a floor, before any calibration."""
    total = sum(num_experts.values())
    removable = sum(num_experts[l] - floors[l] for l in num_experts)
    if budget < 1:
        raise BudgetError(f"The budget removes {budget} experts; it must remove at least 1 of {total}.")
    if budget > removable:
        tightest = {l: floors[l] for l in sorted(floors)}
        raise BudgetError(
            f"Removing {budget} of {total} routed experts would leave some layer below its floor "
            f"(max(top_k, min_experts_per_layer) per layer: {tightest}); at most {removable} "
            f"({removable / total:.1%}) can be removed. Lower pruning_ratio/num_experts_to_prune or "
            "min_experts_per_layer."
        )


def uniform_removals(num_experts: dict[int, int], floors: dict[int, int], budget: int) -> dict[int, int]:
    """Split `budget` as evenly as possible over layers (the local baselines' allocation).

    The remainder goes one each to the deepest layers first (deeper layers are usually the more
    redundant ones, GRAPE Sec. 3); a layer at its floor passes its share to the next.
    """
    check_budget(num_experts, floors, budget)
    layers = sorted(num_experts, reverse=True)
    removals = {l: 0 for l in layers}
    left = budget
    while left > 0:
        open_layers = [l for l in layers if num_experts[l] - removals[l] > floors[l]]
        share = max(1, left // len(open_layers))
        for l in open_layers:
            take = min(share, num_experts[l] - removals[l] - floors[l], left)
            removals[l] += take
            left -= take
            if left == 0:
                break
    return removals
