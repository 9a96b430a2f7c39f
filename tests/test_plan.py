"""`PruningPlan` (plan.py) as JSON: the record of the candidate plans survives a round trip."""

from factories import random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner, PruningPlan


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
