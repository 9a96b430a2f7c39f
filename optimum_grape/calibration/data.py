"""Calibration data: from whatever the user has (strings, a text file, a `datasets` folder or
object, token ids) to fixed-length batches of token ids. Packing documents into full windows means
no padding, so every recorded token is a real one."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import CalibrationDataError

logger = logging.getLogger("optimum_grape")
# Below this many routed tokens per expert on average, counts and similarities are noise.
MIN_ROUTED_PER_EXPERT = 16


def default_calibration_path() -> Path:
    return Path(str(resources.files("optimum_grape") / "data" / "calibration.txt"))


def read_text_documents(path: str | Path) -> list[str]:
    """Documents of a UTF-8 text file, separated by blank lines; a binary, non-UTF-8 or empty file is
    refused."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise CalibrationDataError(f"Cannot read calibration file {str(path)!r}: {err.strerror}.") from None
    if b"\x00" in raw[:65536]:
        raise CalibrationDataError(f"Calibration file {str(path)!r} looks binary (it holds NUL bytes); pass a plain "
                                   "UTF-8 text file or a saved `datasets` folder.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CalibrationDataError(
            f"Calibration file {str(path)!r} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`.") from None
    documents = [doc.strip() for doc in text.split("\n\n") if doc.strip()]
    if not documents:
        raise CalibrationDataError(f"Calibration file {str(path)!r} holds no text; give a file with some documents.")
    return documents


def check_data_type(data: Any, name: str = "Calibration data") -> None:
    """Refuse what cannot be calibration data (a number, bytes, a dict), naming what can."""
    if data is None or isinstance(data, (str, os.PathLike)) or hasattr(data, "column_names"):
        return
    if isinstance(data, (bytes, bytearray, Mapping)) or not isinstance(data, Iterable):
        shown = repr(data) if len(repr(data)) <= 40 else repr(data)[:37] + "..."
        raise CalibrationDataError(
            f"{name}={shown} ({type(data).__name__}) is not calibration data; pass a local text file or saved "
            "`datasets` folder, a list of strings, a datasets.Dataset, token-id tensors, or None for the "
            "calibration text shipped with optimum-grape.")


def load_calibration_data(dataset: Any) -> Any:
    """Resolve `GrapeConfig.dataset` to strings, a `datasets.Dataset` or token ids."""
    check_data_type(dataset)
    if dataset is None:
        return read_text_documents(default_calibration_path())
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        if path.is_file():
            return read_text_documents(path)
        if path.is_dir():
            return _load_saved_dataset(path)
        raise CalibrationDataError(
            f"Calibration dataset {str(dataset)!r} is neither a text file nor a saved `datasets` folder; "
            "pass a local path, a list of strings, or None for the shipped calibration text (no Hub downloads)."
        )
    return dataset


def _load_saved_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError(f"{str(path)!r} is a folder: reading a saved dataset needs `pip install datasets` "
                                   "(or pass a text file).") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise CalibrationDataError(
            f"Calibration folder {str(path)!r} is not a dataset saved with `Dataset.save_to_disk` ({err}); pass such "
            "a folder or a text file.") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return loaded


def warn_if_little_data(num_tokens: int, layers) -> None:
    """Warn, before calibrating, when each expert would see too few routed tokens for its statistics
    to say anything (fewer than MIN_ROUTED_PER_EXPERT on average in some layer)."""
    per_expert = min(num_tokens * layer.top_k / layer.num_experts for layer in layers)
    if per_expert < MIN_ROUTED_PER_EXPERT:
        logger.warning(
            "Calibration has only %d tokens: about %.1f routed tokens per expert (fewer than %d), so routing counts "
            "and similarities are mostly noise and the plan close to arbitrary. Give more text (GrapeConfig.dataset / "
            "--dataset; up to num_samples x sequence_length tokens are used).", num_tokens, per_expert,
            MIN_ROUTED_PER_EXPERT)


def _texts_of(data: Any) -> list[str] | None:
    if isinstance(data, str):
        return [data]
    column_names = getattr(data, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise CalibrationDataError(
                f"The calibration Dataset has columns {column_names}; it needs a 'text' column "
                "(or pass token ids instead)."
            )
        return [t for t in data["text"] if t]
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        return list(data)
    return None


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens. Long documents are expected here (we pack them
    into windows ourselves), so fast tokenizers are called directly, without transformers' warning
    about exceeding the model's maximum length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_stream(data: Any, tokenizer=None) -> torch.Tensor:
    """All calibration tokens as one 1-D LongTensor, documents joined by the tokenizer's EOS."""
    check_data_type(data)
    texts = _texts_of(data)
    if texts is not None:
        if tokenizer is None:
            raise CalibrationDataError(
                "Calibration data is text but no tokenizer was given: pass tokenizer=AutoTokenizer.from_pretrained(...) "
                "or give token ids (an iterable of LongTensors)."
            )
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        for text in texts:
            ids.extend(encode_text(tokenizer, text) + sep)
        return torch.tensor(ids, dtype=torch.long)
    pieces = []
    for item in data if isinstance(data, Iterable) else []:
        tensor = torch.as_tensor(item)
        if tensor.dtype not in (torch.int64, torch.int32) or tensor.dim() > 2:
            raise CalibrationDataError(
                f"Calibration items must be strings or integer token-id tensors of 1 or 2 dims; got {tensor.dtype} "
                f"with shape {tuple(tensor.shape)}."
            )
        pieces.append(tensor.long().flatten())
    if not pieces:
        raise CalibrationDataError("Calibration data is empty: give at least one non-empty text or token sequence.")
    return torch.cat(pieces)


def calibration_windows(data: Any, tokenizer=None, sequence_length: int = 256) -> torch.Tensor:
    """Every full window of `sequence_length` tokens of the token stream, [N, L] (the stream itself
    when it is shorter than one window)."""
    stream = token_stream(data, tokenizer)
    if stream.numel() < 2:
        raise CalibrationDataError(f"Calibration data has {stream.numel()} token(s); at least 2 are needed.")
    length = min(sequence_length, stream.numel())
    return stream[: (stream.numel() // length) * length].view(-1, length)


def calibration_batches(data: Any, tokenizer=None, num_samples: int = 64, sequence_length: int = 256,
                        batch_size: int = 8) -> list[torch.Tensor]:
    """Fixed-length windows of the token stream, at most `num_samples`, grouped in batches."""
    return list(calibration_windows(data, tokenizer, sequence_length)[:num_samples].split(batch_size))


def held_aside(windows: torch.Tensor, num_samples: int, count: int) -> tuple[torch.Tensor, bool]:
    """`count` windows for scoring candidate plans: those right after the `num_samples` used for
    statistics when the data has them (unseen by calibration), else its last windows, which then
    overlap calibration (second value True)."""
    if count <= 0:
        return windows[:0], False
    if windows.shape[0] >= num_samples + count:
        return windows[num_samples:num_samples + count], False
    return windows[-count:], True
