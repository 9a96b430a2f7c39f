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


def _probe_and_candidates(model, config):
    """The plans GRAPE scores: each layer's probe merges alone, then its candidates."""
    pruner = GrapePruner(config)
    stats = pruner.calibrate(model, random_token_batches(n=12))
    plan = pruner.plan(stats, model)
    return pruner, plan


def test_streamed_scores_are_those_of_full_forwards():
    """Scoring streams the decoder a layer at a time, with one layer's merged experts in memory; each
    layer runs the full forward's operations on the same inputs, so every score is bit for bit the one a
    full forward per plan gives (planning/scoring.py), for plans changing one layer or all of them."""
    from optimum_grape.planning.scoring import _score_with_full_forwards, stream_scores
    from optimum_grape.calibration.stream import decoder_layers

    for family in ("mixtral", "qwen2_moe"):
        model = tiny_model(family)
        pruner, plan = _probe_and_candidates(model, small(pruning_ratio=0.25))
        first, last = min(plan.clusters), max(plan.clusters)
        plans = [plan, plan.restricted_to([first]), plan.restricted_to([last])]
        batches = pruner.selection_batches
        streamed = stream_scores(model, decoder_layers(model)[1], find_moe_layers(model), plans, batches)
        assert streamed == _score_with_full_forwards(model, plans, batches), family


def test_a_model_that_cannot_be_streamed_is_scored_with_full_forwards(monkeypatch):
    from optimum_grape.errors import UnsupportedModelError
    from optimum_grape.planning import scoring

    model = tiny_model("mixtral")
    pruner, plan = _probe_and_candidates(model, small(pruning_ratio=0.25))
    expected = scoring.score_plans(model, [plan], pruner.selection_batches)

    def refuse(model, *args, **kwargs):
        raise UnsupportedModelError("runs decoder layer 0 more than once per forward; ...")

    monkeypatch.setattr(scoring, "capture", refuse)
    assert scoring.score_plans(model, [plan], pruner.selection_batches) == expected
