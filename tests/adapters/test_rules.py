"""The routing rules tried on an unknown router (adapters/rules.py): a router that does not read the
experts' input is refused before calibration for methods that need router logits."""

import pytest

from optimum_grape import GrapeConfig, GrapePruner, UnsupportedModelError
from optimum_grape.coverage.tiny import build_tiny, scale_like_trained


def small_pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, batch_size=4, max_tokens_per_layer=64,
                                   **kwargs))


def test_methods_needing_router_logits_are_refused_before_calibration_when_the_router_reads_other_inputs():
    model = build_tiny("gemma4")  # the router reads the residual, the experts a normed copy of it
    scale_like_trained(model)
    with pytest.raises(UnsupportedModelError, match="does not read the experts' input.*router_merge"):
        small_pruner(pruning_ratio=0.25, method="router_merge").calibrate(model, [])  # [] would fail later
