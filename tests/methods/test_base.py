"""The method protocol and registry (methods/base.py), over every registered method: an allocation a
method does not offer is refused; every method honours the budget and the floors on constructed
statistics; one matrix of method x allocation x core family on tiny models (budget exact, floors,
save and reload in a fresh process give equal logits)."""

import pytest
import torch

from factories import CORE_FAMILIES, plan_for, random_token_batches, tiny_model
from helpers import logits, logits_of_many_in_one_process
from optimum_grape import GrapeConfig, GrapeConfigError, GrapePruner
from optimum_grape.methods import METHODS


def test_incompatible_allocation_is_a_clear_error():
    from optimum_grape import GrapeConfigError
    from optimum_grape.methods import PruningMethod, register_method, METHODS

    class LocalOnly(PruningMethod):
        name = "_local_only_test"
        allocations = ("uniform",)

    register_method(LocalOnly())
    try:
        with pytest.raises(GrapeConfigError, match="does not apply"):
            GrapeConfig(method="_local_only_test", allocation="global", pruning_ratio=0.25)
    finally:
        METHODS.pop("_local_only_test")


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_every_method_honours_budget_and_floors(method, allocation):
    if allocation not in METHODS[method].allocations:
        with pytest.raises(GrapeConfigError, match="does not apply"):
            GrapeConfig(method=method, allocation=allocation, num_experts_to_prune=4)
        return
    for budget in (1, 5, 12, 24):
        plan = plan_for(method, num_experts_to_prune=budget, allocation=allocation,
                        method_kwargs={"max_subsets": 100000} if method == "enumerate" else {})
        assert plan.num_removed == budget
        assert min(plan.experts_per_layer.values()) >= 2


MATRIX = [(m, a) for m in sorted(METHODS) for a in ("global", "uniform") if a in METHODS[m].allocations]


@pytest.fixture(scope="module")
def matrix_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    results = []
    for family in CORE_FAMILIES:
        batches = random_token_batches(n=8, length=32)
        for method, allocation in MATRIX:
            model = tiny_model(family)
            pruner = GrapePruner(GrapeConfig(method=method, allocation=allocation, pruning_ratio=0.25,
                                             num_samples=8, sequence_length=32, max_tokens_per_layer=64))
            pruner.prune(model, batches)
            folder = pruner.save_pretrained(model, root / f"{family}-{method}-{allocation}")
            results.append((family, method, allocation, pruner.last_plan, logits(model), folder))
    reloaded = logits_of_many_in_one_process([r[-1] for r in results])
    return [(*r[:5], again) for r, again in zip(results, reloaded)]


def test_matrix_budget_floors_and_reload(matrix_results):
    assert len(matrix_results) == 3 * len(MATRIX)
    for family, method, allocation, plan, expected, again in matrix_results:
        label = f"{family}/{method}/{allocation}"
        assert plan.num_removed == 8, label
        assert min(plan.experts_per_layer.values()) >= 2, label
        if allocation == "uniform":
            assert set(plan.experts_per_layer.values()) == {6}, label
        assert torch.allclose(again, expected, atol=1e-5), label
