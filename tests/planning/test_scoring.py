"""Scoring candidate plans end to end (planning/scoring.py): the model is left exactly as it was,
and an empty list of plans scores nothing."""

import torch

from factories import random_token_batches, tiny_model
from helpers import logits
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.adapters import find_moe_layers
from optimum_grape.planning.scoring import score_plans


def small(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128, selection_samples=4)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_scoring_candidates_leaves_the_model_exactly_as_it_was():
    model = tiny_model("mixtral")
    before = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = GrapePruner(small(pruning_ratio=0.25))
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=12)), model)
    assert len(plan.metadata["candidates"]) >= 2 and plan.metadata["selection"]["metric"]
    assert torch.equal(logits(model), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert sum(l.num_experts for l in find_moe_layers(model)[1]) == 32


def test_an_empty_plan_list_scores_nothing():
    assert score_plans(tiny_model("mixtral"), [], [torch.stack(random_token_batches(n=2))]) == []
