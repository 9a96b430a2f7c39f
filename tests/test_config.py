import pytest

from optimum_grape import GrapeConfig, GrapeConfigError


def test_round_trip_is_exact():
    config = GrapeConfig(pruning_ratio=0.3, similarity="cosine", entropy_tolerance=0.2, dataset=["a", "b"],
                         method_kwargs={"gammas": [0.1, 0.3]})
    again = GrapeConfig.from_json(config.to_json_string())
    assert again.to_dict() == config.to_dict()
    assert GrapeConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kwargs, needle", [
    ({}, "exactly one budget"),
    ({"pruning_ratio": 0.2, "num_experts_to_prune": 3}, "exactly one budget"),
    ({"pruning_ratio": 0.0}, "outside (0, 1)"),
    ({"pruning_ratio": 1.0}, "outside (0, 1)"),
    ({"num_experts_to_prune": 0}, ">= 1"),
    ({"pruning_ratio": 0.2, "similarity": "l2"}, "similarity='l2'"),
    ({"pruning_ratio": 0.2, "entropy_tolerance": 1.5}, "[0, 1]"),
    ({"pruning_ratio": 0.2, "method": "nope"}, "registered method"),
    ({"pruning_ratio": 0.2, "min_experts_per_layer": 0}, ">= 1"),
    ({"pruning_ratio": 0.2, "merge": "sum"}, "merge='sum'"),
])
def test_invalid_values_name_the_value_and_the_fix(kwargs, needle):
    with pytest.raises(GrapeConfigError, match=None) as err:
        GrapeConfig(**kwargs)
    assert needle in str(err.value)


def test_unknown_field_is_refused():
    with pytest.raises(GrapeConfigError, match="Unknown GrapeConfig fields"):
        GrapeConfig.from_dict({"pruning_ratio": 0.1, "ratio": 0.2})


def test_budget_for():
    assert GrapeConfig(pruning_ratio=0.25).budget_for(32) == 8
    assert GrapeConfig(num_experts_to_prune=3).budget_for(32) == 3
