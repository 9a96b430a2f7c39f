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
