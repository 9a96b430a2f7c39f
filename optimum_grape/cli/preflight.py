"""What `optimum-grape prune` is given, read and checked before the model is loaded: a plan or
statistics file, `--method-kwargs` and the numbers argparse cannot bound (the base model's location
is checked by `checkpoint.load.resolve_base`). Each problem is a GrapeError (exit status 2) that names the
value and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GrapeError


def read_plan_file(path: str):
    from ..plan import PruningPlan

    file = Path(path)
    if not file.is_file():
        raise GrapeError(f"--plan {path!r} is not a file; pass the grape_plan.json of an earlier prune.")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GrapeError(f"--plan {path!r} cannot be read as UTF-8 JSON ({err}); pass a grape_plan.json.") from None
    return PruningPlan.from_json(text)


def read_stats_file(path: str):
    from ..stats import ExpertStats

    if not Path(path).is_file():
        raise GrapeError(f"--stats {path!r} is not a file; pass statistics written by --save-stats.")
    return ExpertStats.load(path)


def parse_method_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise GrapeError(f"--method-kwargs {text!r} is not valid JSON ({err}); pass an object such as "
                         "'{\"max_subsets\": 100}'.") from None
    if not isinstance(value, dict):
        raise GrapeError(f"--method-kwargs {text!r} must be a JSON object such as '{{\"max_subsets\": 100}}'.")
    return value


def check_eval_tokens(value: int) -> None:
    if value < 2:
        raise GrapeError(f"--eval-tokens {value} must be an integer >= 2 (perplexity needs two tokens); e.g. 8192.")


def parse_number(flag: str, value: str) -> float:
    """A flag argparse takes as a string because it also accepts a word ('auto', 'none')."""
    try:
        return float(value)
    except ValueError:
        raise GrapeError(f"{flag} {value!r} is not a number.") from None


def check_repo_id(flag: str, value: str) -> None:
    """A Hub repository id `ORG/NAME` (what the Hub accepts), checked before any work."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise GrapeError(f"{flag} {value!r} is not a valid Hub repository id ({str(err).splitlines()[0]}); "
                         "use ORG/NAME with letters, digits, '-', '_' and '.'.") from None
    if "/" not in value:
        raise GrapeError(f"{flag} {value!r} names no owner; use ORG/NAME, e.g. my-org/mixtral-grape.")


def check_can_push(flag: str) -> None:
    """Refuse an upload before any work when this process may not reach the Hub."""
    from ..checkpoint.load import offline

    if offline():
        raise GrapeError(f"{flag} asks for an upload, but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; "
                         "unset it, or write the folder only and upload it later with `huggingface-cli upload`.")


def check_threshold(flag: str, value: float, minimum: float, example: str) -> None:
    """A quality gate's limit: finite and at least `minimum` (NaN compares false and would pass all)."""
    import math

    if not math.isfinite(value) or value < minimum:
        raise GrapeError(f"{flag} {value} must be a finite number >= {minimum}; use e.g. {example}.")
