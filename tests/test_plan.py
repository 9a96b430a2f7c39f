"""`PruningPlan` (plan.py) as JSON: the record of the candidate plans survives a round trip."""

import pytest

from factories import random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner, PruningPlan
from optimum_grape.errors import PlanError


def small(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128, selection_samples=4)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_plan_json_round_trips_candidates():
    model = tiny_model("mixtral")
    pruner = GrapePruner(small(pruning_ratio=0.25))
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=12)), model)
    again = PruningPlan.from_json(plan.to_json())
    assert again.metadata["candidates"] == plan.metadata["candidates"]


@pytest.mark.parametrize("text, needle", [
    (PruningPlan(clusters={0: [[0], [1]]}, num_experts_before={0: 2}).to_json().replace(
        '"num_experts_before": {\n    "0": 2', '"num_experts_before": {\n    "0": 1000000000000000'),
     "they hold 2 expert ids"),
    ("[" * 200_000 + "]" * 200_000, "nests JSON deeper"),
    ('{"metadata": "' + "x" * (17 * 1024 * 1024) + '"}', "more than any plan optimum-grape writes"),
])
def test_a_plan_file_cannot_exhaust_memory_or_recursion(text, needle):
    # issue 25: num_experts_before 10**15 -> MemoryError, deep nesting -> RecursionError, 100 MB copied
    with pytest.raises(PlanError, match=needle):
        PruningPlan.from_json(text)
