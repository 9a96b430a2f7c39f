"""Finding and loading models by name: the embedded default model, the shipped held-out text, and
`load_model_and_tokenizer`, which every command and `evaluate` module uses (plugin registered, so
pruned checkpoints with different expert counts per layer load too). A path that looks local is
never looked up on the Hub, and with HF_HUB_OFFLINE set only the local cache is searched."""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path

from ..errors import GrapeError, remote_code_hint
from ..runtime.memory import return_free_memory

DEFAULT_MODEL = "default"


def default_model_path() -> Path:
    return Path(str(resources.files("optimum_grape") / "default_model"))


def heldout_paths() -> list[Path]:
    return sorted(Path(str(resources.files("optimum_grape") / "data" / "heldout")).glob("*.txt"))


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


def load_base(base: str, trust_remote_code: bool, device_map=None):
    """Model and tokenizer from a folder or a Hub id (from the local cache only when offline)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, **({"local_files_only": True} if offline() else {})}
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        with reading_without_a_map() if device_map is None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs, **placement)
        return_free_memory()
        return model, AutoTokenizer.from_pretrained(base, **kwargs)
    except SafetensorError as err:
        raise GrapeError(f"A weight file of {base!r} is damaged or truncated ({str(err).splitlines()[0]}); copy or "
                         "download it again (`optimum-grape inspect --verify` checks a pruned checkpoint's files "
                         "against its manifest).") from None
    except RuntimeError as err:
        # transformers reports weights whose shapes disagree with config.json (an edited expert count, a
        # wrong router) as a RuntimeError after its load report.
        raise GrapeError(f"The weights of {base!r} do not fit its config.json ({str(err).splitlines()[0]}); the "
                         "load report above names the tensors. Restore the config (e.g. an edited "
                         "num_local_experts) or the weights, and never load with ignore_mismatched_sizes=True.") \
            from None
    except (OSError, ValueError) as err:
        where = "" if Path(base).exists() else (
            " It is not a local folder, and HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched."
            if offline() else " It is not a local folder; as a Hub id it could not be fetched.")
        hint = "" if trust_remote_code else remote_code_hint(str(err))
        raise GrapeError(f"Cannot load a causal LM and its tokenizer from {base!r}.{where} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}){hint}") from None
    except Exception as err:  # noqa: BLE001 -- transformers fails in its own ways on a malformed config.json
        raise GrapeError(f"transformers cannot load {base!r} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no message'}); its config.json or weights are "
                         "malformed or edited: restore them from the model's source.") from None



@contextlib.contextmanager
def reading_without_a_map():
    """During the block, transformers reads safetensors on the CPU tensor by tensor with pread, one
    conversion at a time, instead of memory-mapping the shards and reading them on 4 threads.

    Why: a mapped checkpoint stays mapped while any weight is a view into it, and every page read
    while fusing experts stays resident, so a loaded model held ~2x its size (1.0x fused experts +
    0.97x file pages on the 1.5 GB benchmark model); the threads read every tensor before fusing
    consumes it, another copy at the peak. With pread and one conversion at a time, the peak is the
    model plus one layer's experts (benchmarks/scale.py). transformers picks the backend itself
    (pread only for MPS and Windows) and reads HF_DEACTIVATE_ASYNC_LOAD at load time, so both are set
    here for the block: `safe_open` in transformers.modeling_utils is wrapped (tests/checkpoint/
    test_load.py fails if transformers stops opening shards through it) and the variable restored."""
    import transformers.modeling_utils as loading

    original = loading.safe_open

    def open_with_pread(*args, **kwargs):
        if kwargs.get("backend", "mmap") == "mmap" and str(kwargs.get("device", "cpu")) == "cpu":
            kwargs["backend"] = "pread"
        return original(*args, **kwargs)

    previous = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    loading.safe_open, os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = open_with_pread, "1"
    try:
        yield
    finally:
        loading.safe_open = original
        if previous is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = previous


def load_model_and_tokenizer(name_or_path: str, tokenizer=None, trust_remote_code: bool = False,
                             device: str | None = None, device_map=None):
    """Model (in eval mode) and tokenizer from 'default', a folder or a cached Hub id (`load_base`);
    `device` moves the model there, `device_map` (e.g. "auto") lets accelerate place it."""
    model, own = load_base(resolve_base(name_or_path), trust_remote_code, device_map)
    if device is not None:
        model = model.to(resolve_device(device))
    return model.eval(), tokenizer if tokenizer is not None else own


def resolve_device(device: str) -> str:
    """`device`, with "cuda" meaning this process's GPU under torchrun (LOCAL_RANK); refused when absent."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GrapeError(f"--device {device}: no CUDA device is available here; use --device cpu.")
        if device == "cuda":
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    elif device != "cpu" and not device.startswith(("mps", "xpu")):
        raise GrapeError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N.")
    return device
