"""The one error hierarchy of optimum-grape.

Every error says the offending value, the allowed range and the fix, and is raised before
calibration whenever the problem can be seen from the config and the model alone.
"""


class GrapeError(Exception):
    """Base class of every error raised by optimum-grape."""


class GrapeConfigError(GrapeError, ValueError):
    """A `GrapeConfig` field, or a combination of fields, is invalid."""


class UnsupportedModelError(GrapeError, ValueError):
    """The model cannot be pruned as it is: it is dense, its MoE family has no adapter, or its
    weights hold NaN or Inf."""


class BudgetError(GrapeError, ValueError):
    """The pruning budget cannot be met without breaking a per-layer floor."""


class CalibrationDataError(GrapeError, ValueError):
    """The calibration data is empty, malformed, or needs a tokenizer that was not given."""


class CheckpointError(GrapeError, OSError):
    """Saving or loading a pruned checkpoint would lose or corrupt data."""


class PlanError(GrapeError, ValueError):
    """A pruning plan is malformed, or does not fit the model it is applied to."""


class StatsError(GrapeError, ValueError):
    """A calibration statistics file is malformed, or was edited into an inconsistent state."""


class RegistrationError(GrapeError, ValueError):
    """A model family or a method is registered twice, or registered with an invalid description."""


def remote_code_hint(message: str) -> str:
    """The fix to add when transformers refused a model because it ships its own Python code."""
    if "trust_remote_code" in message or "custom code" in message:
        return (" This model ships its own Python code (config.json's auto_map): read it, then pass "
                "--trust-remote-code (Python: trust_remote_code=True) to run it.")
    return ""
