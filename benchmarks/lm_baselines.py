"""Add-k smoothed unigram / bigram language-model baselines over token ids.

Owns the count-based reference points that the default model's held-out perplexity is
compared against in ``benchmarks/train_moe.py``. Everything works on integer token
streams, so the baselines use exactly the tokenizer and the target tokens of the model
evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

K_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def window_targets(win: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(previous token, target token) pairs of the model evaluation: in each fixed window
    the first token is context only, positions 1..L-1 are predicted."""
    w = win.numpy()
    return w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)


@dataclass
class AddK:
    """An add-k smoothed n-gram model, order 1 (unigram) or 2 (bigram)."""

    order: int
    vocab: int
    counts: np.ndarray  # order 1: (V,), order 2: (V, V)
    k: float = 1.0

    def log_probs(self, prev: np.ndarray, tgt: np.ndarray, k: float | None = None) -> np.ndarray:
        k = self.k if k is None else k
        if self.order == 1:
            num = self.counts[tgt] + k
            den = self.counts.sum() + k * self.vocab
        else:
            num = self.counts[prev, tgt] + k
            den = self._row_sums[prev] + k * self.vocab
        return np.log(num / den)

    def __post_init__(self) -> None:
        if self.order == 2:
            self._row_sums = self.counts.sum(axis=1)

    def perplexity(self, prev: np.ndarray, tgt: np.ndarray, k: float | None = None) -> float:
        return math.exp(-float(self.log_probs(prev, tgt, k).mean()))


def fit_add_k(stream: np.ndarray, vocab: int, order: int, tune_on: np.ndarray | None = None) -> AddK:
    """Count n-grams of a token stream; if `tune_on` (another token stream) is given,
    pick k from K_GRID by its perplexity (the held-out sets are never used for this)."""
    s = np.asarray(stream, dtype=np.int64)
    if order == 1:
        counts = np.bincount(s, minlength=vocab).astype(np.float64)
    elif order == 2:
        counts = np.bincount(s[:-1] * vocab + s[1:], minlength=vocab * vocab).reshape(vocab, vocab)
        counts = counts.astype(np.float64)
    else:
        raise ValueError(f"order must be 1 or 2, got {order}")
    model = AddK(order=order, vocab=vocab, counts=counts)
    if tune_on is not None:
        t = np.asarray(tune_on, dtype=np.int64)
        model.k = min(K_GRID, key=lambda k: model.perplexity(t[:-1], t[1:], k))
    return model
