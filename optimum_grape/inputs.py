"""What `optimum-grape prune` is given, read and checked before the model is loaded: the base
model's location (never the network for a path that looks local, or when HF_HUB_OFFLINE is set), a
plan or statistics file, `--method-kwargs` and the numbers argparse cannot bound. Each problem is
a GrapeError (exit status 2) that names the value and the fix.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from .errors import GrapeError

DEFAULT_MODEL = "default"


def default_model_path() -> Path:
    return Path(str(resources.files("optimum_grape") / "default_model"))


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now rather than at import."""
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_id(base: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(base)
    except HFValidationError:
        return False
    return not base.startswith((".", "~"))


def resolve_base(base: str) -> str:
    """The folder (or Hub id) to load BASE from. A path that exists must be a model folder; one that
    does not is refused here, without asking the Hub, unless it can only be a Hub id ('org/name')."""
    if base == DEFAULT_MODEL:
        path = default_model_path()
        if not (path / "config.json").exists():
            raise GrapeError(f"The embedded default model is missing at {path}; reinstall optimum-grape.")
        return str(path)
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise GrapeError(f"BASE {base!r} is not a model folder (no config.json in it); pass the folder a "
                             "transformers model was saved to, a cached Hub id, or 'default'.")
        return str(path)
    if not looks_like_hub_id(base):
        raise GrapeError(f"Model folder {base!r} does not exist (and it is not a Hub id such as 'org/name'); check the "
                         "path, or pass 'default' for the model shipped with optimum-grape.")
    return base


def load_base(base: str, trust_remote_code: bool):
    """Model and tokenizer from a folder or a Hub id (from the local cache only when offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, **({"local_files_only": True} if offline() else {})}
    try:
        return AutoModelForCausalLM.from_pretrained(base, **kwargs), AutoTokenizer.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as err:
        where = "" if Path(base).exists() else (
            " It is not a local folder, and HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched."
            if offline() else " It is not a local folder; as a Hub id it could not be fetched.")
        raise GrapeError(f"Cannot load a causal LM and its tokenizer from {base!r}.{where} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


def read_plan_file(path: str):
    from .plan import PruningPlan

    file = Path(path)
    if not file.is_file():
        raise GrapeError(f"--plan {path!r} is not a file; pass the grape_plan.json of an earlier prune.")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GrapeError(f"--plan {path!r} cannot be read as UTF-8 JSON ({err}); pass a grape_plan.json.") from None
    return PruningPlan.from_json(text)


def read_stats_file(path: str):
    from .stats import ExpertStats

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
