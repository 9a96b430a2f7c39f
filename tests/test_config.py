"""`GrapeConfig` (config.py): an exact JSON round trip, presets that fill only the fields left unset,
and every invalid value refused with the value and the fix."""

import pytest

from optimum_grape import CalibrationDataError, GrapeConfig, GrapeConfigError


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


@pytest.mark.parametrize("kwargs, needle", [
    ({"seed": "1"}, "seed='1' must be an integer"),
    ({"seed": 1.5}, "seed=1.5"),
    ({"seed": True}, "seed=True"),
    ({"seed": 2**70}, "must be an integer in [0, 4294967295]"),  # issue 25: was an overflow traceback
    ({"seed": -1}, "seed=-1"),
    ({"entropy_tolerance": "0.1"}, "entropy_tolerance='0.1'"),
    ({"method_kwargs": {"gamas": [0.1]}}, "['gamas'] are not read by method 'grape'; its keys: {'gammas'"),
    ({"method": "cprune", "method_kwargs": {"alpah": 2.0}}, "its keys: {'alpha'"),
    ({"method": "cprune", "method_kwargs": {"alpha": "big"}}, "method_kwargs['alpha']='big' must be a number"),
    ({"method": "enumerate", "method_kwargs": {"max_subsets": 0}}, "must be an integer in [1, inf]"),
    ({"method": "frequency", "method_kwargs": {"gammas": [0.1]}}, "its keys: none"),
    ({"dataset": 123}, "GrapeConfig.dataset=123 (int) is not calibration data"),
])
def test_config_types_are_checked(kwargs, needle):
    with pytest.raises((GrapeConfigError, CalibrationDataError)) as err:
        GrapeConfig(pruning_ratio=0.25, **kwargs)
    assert needle in str(err.value)


def test_align_neurons_must_be_a_bool():
    from optimum_grape import GrapeConfigError

    with pytest.raises(GrapeConfigError, match="align_neurons"):
        GrapeConfig(pruning_ratio=0.25, align_neurons="yes")


def test_presets_fill_only_the_fields_left_unset():
    default = GrapeConfig(pruning_ratio=0.25)
    assert (default.similarity, default.entropy_tolerance, default.layer_cap, default.protect_super_experts) == \
        ("merge_cost", "auto", 2.0, True)
    paper = GrapeConfig(pruning_ratio=0.25, preset="paper")
    assert (paper.similarity, paper.entropy_tolerance, paper.layer_cap, paper.protect_super_experts) == \
        ("cka", 0.1, None, False)
    mixed = GrapeConfig(pruning_ratio=0.25, preset="paper", similarity="mse", layer_cap=3.0)
    assert (mixed.similarity, mixed.layer_cap, mixed.entropy_tolerance) == ("mse", 3.0, 0.1)
    assert GrapeConfig.from_dict(default.to_dict()) == default


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "fast"}, "preset='fast'"),
    ({"entropy_tolerance": "sometimes"}, "'auto'"),
    ({"layer_cap": 0.5}, "layer_cap=0.5"),
    ({"protect_super_experts": "yes"}, "True or False"),
    ({"selection_samples": -1}, "selection_samples=-1"),
])
def test_bad_default_knobs_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(GrapeConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GrapeConfig(pruning_ratio=0.25, **kwargs)


@pytest.mark.parametrize("ratio", ["0.25", b"0.25", [0.25], True])
def test_a_ratio_of_the_wrong_type_is_reported_as_a_type_error_not_a_range(ratio):
    # issue 25: pruning_ratio='0.25' was reported as "outside (0, 1)"
    with pytest.raises(GrapeConfigError, match=r"not a number; pass a float such as 0.25"):
        GrapeConfig(pruning_ratio=ratio)
