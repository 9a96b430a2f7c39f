"""Calibration data: from whatever the user has (strings, a text file, a `datasets` folder or
object, token ids) to fixed-length windows of token ids. Packing documents into full windows means
no padding, so every recorded token is a real one.

Sampling (`sample_windows`): documents are visited in a seeded random order, so a file ordered by
domain (or a dataset in document order) is calibrated on all of it, not on its first domain; they
are tokenized one at a time until the calibration windows are full, and the windows held aside to
score candidate plans come from the documents after those, which calibration never saw. Only the
documents needed are tokenized. A document of a text file is a block separated by a blank line; of
a list or `datasets.Dataset`, one item."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# Calibration text with fewer distinct tokens than this share of its length (a repeated character,
# one line pasted many times) says little about how the model routes real text.
MIN_DISTINCT_SHARE = 0.02


def warn_if_degenerate(windows: torch.Tensor) -> None:
    distinct, total = int(torch.unique(windows).numel()), int(windows.numel())
    if total >= 256 and distinct < max(16, MIN_DISTINCT_SHARE * total):
        logger.warning(
            "Calibration data is degenerate: %d distinct tokens in %d (a repeated character or line?). The statistics "
            "will describe the model on this text only; give ordinary text from the domains you care about "
            "(GrapeConfig.dataset / --dataset).", distinct, total)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens. Long documents are expected here (we pack them
    into windows ourselves), so fast tokenizers are called directly, without transformers' warning
    about exceeding the model's maximum length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def documents_of(data: Any) -> Sequence:
    """The documents of calibration data, each a string or a token-id tensor, read lazily where the
    source allows it (a `datasets.Dataset` row by row)."""
    check_data_type(data)
    if isinstance(data, str):
        return [data]
    column_names = getattr(data, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise CalibrationDataError(
                f"The calibration Dataset has columns {column_names}; it needs a 'text' column "
                "(or pass token ids instead)."
            )
        return _DatasetTexts(data)
    items = list(data) if isinstance(data, Iterable) else []
    if not items:
        raise CalibrationDataError("Calibration data is empty: give at least one non-empty text or token sequence.")
    return items


class _DatasetTexts(Sequence):
    """A dataset's 'text' column, one row at a time (a large dataset is never read whole)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        text = self.dataset[int(index)]["text"]
        if not isinstance(text, str):
            raise CalibrationDataError(f"The calibration Dataset's 'text' column holds {type(text).__name__} values "
                                       f"(row {index}: {str(text)[:40]!r}); it must hold strings.")
        return text


# A text document is tokenised from its start, in prefixes of this many characters per token still
# needed (doubling while too few come out), so a huge file with no blank line, used for 16k tokens,
# is never tokenised whole (issue 25: 50 MB peaked at 9.6 GB).
CHARS_PER_TOKEN = 8


def document_ids(document, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of one document, followed by the tokenizer's EOS when it is text. With `max_tokens`,
    a text document is read only as far as it takes to give that many tokens (then no EOS)."""
    if isinstance(document, str):
        if tokenizer is None:
            raise CalibrationDataError(
                "Calibration data is text but no tokenizer was given: pass tokenizer=AutoTokenizer.from_pretrained(...) "
                "or give token ids (an iterable of LongTensors)."
            )
        chars = None if max_tokens is None else max(64, max_tokens * CHARS_PER_TOKEN)
        while chars is not None and chars < len(document):
            ids = encode_text(tokenizer, document[:chars])
            if len(ids) > max_tokens:  # the last token may be cut mid-word: drop it
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
            chars *= 2
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return torch.tensor(encode_text(tokenizer, document) + sep if document else [], dtype=torch.long)
    tensor = torch.as_tensor(document)
    if tensor.dtype not in (torch.int64, torch.int32) or tensor.dim() > 2:
        raise CalibrationDataError(
            f"Calibration items must be strings or integer token-id tensors of 1 or 2 dims; got {tensor.dtype} "
            f"with shape {tuple(tensor.shape)}."
        )
    return tensor.long().flatten()


@dataclass
class CalibrationSample:
    """What calibration records (`windows`) and what scores candidate plans (`held_aside`)."""

    windows: torch.Tensor  # [n, L]
    held_aside: torch.Tensor  # [m, L]
    held_aside_unseen: bool  # drawn from documents calibration did not use
    documents_used: int
    documents_total: int


def sample_windows(data: Any, tokenizer=None, sequence_length: int = 256, num_samples: int = 64,
                   held_aside: int = 0, seed: int = 0) -> CalibrationSample:
    """`num_samples` windows of `sequence_length` tokens packed from documents in a seeded random order,
    then up to `held_aside` windows packed from the documents after them. When no document is left
    for those, the last calibration windows are held aside instead (`held_aside_unseen` False)."""
    documents = documents_of(data)
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    groups: list[list[torch.Tensor]] = [[], []]
    wanted = [num_samples, held_aside]
    used, buffer, stage = 0, torch.zeros(0, dtype=torch.long), 0
    for index in order:
        if stage == 1 and held_aside <= 0:
            break
        still = (wanted[stage] - len(groups[stage])) * sequence_length - buffer.numel()
        ids = document_ids(documents[index], tokenizer, max_tokens=still + 1)
        used += 1
        buffer = torch.cat([buffer, ids])
        while buffer.numel() >= sequence_length and len(groups[stage]) < wanted[stage]:
            groups[stage].append(buffer[:sequence_length])
            buffer = buffer[sequence_length:]
        if len(groups[stage]) >= wanted[stage]:
            if stage == 1:
                break
            stage, buffer = 1, torch.zeros(0, dtype=torch.long)  # the rest of this document is not held aside
    if not groups[0]:
        if stage == 0 and buffer.numel() >= 2:  # less than one window of data: the stream itself
            groups[0] = [buffer]
        else:
            raise CalibrationDataError(f"Calibration data has {buffer.numel()} token(s); at least 2 are needed.")
    windows = torch.stack(groups[0])
    unseen = bool(groups[1])
    aside = torch.stack(groups[1]) if unseen else windows[-held_aside:] if held_aside > 0 else windows[:0]
    return CalibrationSample(windows=windows, held_aside=aside, held_aside_unseen=unseen or held_aside <= 0,
                             documents_used=used, documents_total=len(documents))


def calibration_batches(data: Any, tokenizer=None, num_samples: int = 64, sequence_length: int = 256,
                        batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """The calibration windows `GrapePruner` records (`sample_windows`), grouped in batches."""
    return list(sample_windows(data, tokenizer, sequence_length, num_samples, 0, seed).windows.split(batch_size))


def check_token_ids(ids: torch.Tensor, model) -> None:
    """Every calibration token id must index the model's input embedding."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None or ids.numel() == 0:
        return
    largest, smallest = int(ids.max()), int(ids.min())
    if largest >= rows or smallest < 0:
        raise CalibrationDataError(
            f"Calibration token ids run from {smallest} to {largest}, but the model's embedding has {rows} rows "
            "(ids 0.." f"{rows - 1}): the tokenizer (or the token ids given) belongs to another model. Use the "
            "model's own tokenizer.")
