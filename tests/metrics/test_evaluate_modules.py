"""The `evaluate` modules (metrics/: grape_perplexity, grape_comparison, loaded by `module_path`)
compute exactly what `optimum-grape prune --evaluate` reported."""

import json

import pytest


def test_evaluate_module_gives_the_cli_perplexity(pruned_cli):
    """`evaluate.load(<module path>)` computes exactly what `prune --evaluate` reported."""
    import evaluate

    from optimum_grape.cli import heldout_paths
    from optimum_grape.metrics import module_path

    out, _ = pruned_cli
    reported = json.loads((out / "grape_card.json").read_text())["evaluation"]
    paths = heldout_paths()
    module = evaluate.load(module_path("grape_perplexity"), keep_in_memory=True)
    result = module.compute(predictions=[p.read_text() for p in paths], model=str(out), max_tokens=256, window=32)
    for path, value in zip(paths, result["perplexities"]):
        assert value == pytest.approx(reported[f"perplexity ({path.stem})"]["after"], rel=1e-9)
    ratios = evaluate.load(module_path("grape_comparison"), keep_in_memory=True).compute(
        predictions=[reported[f"perplexity ({p.stem})"]["after"] for p in paths],
        references=[reported[f"perplexity ({p.stem})"]["before"] for p in paths])["ratios"]
    assert ratios == pytest.approx([reported[f"perplexity ({p.stem})"]["ratio"] for p in paths])
