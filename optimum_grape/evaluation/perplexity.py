"""Measuring a model before and after pruning, offline: perplexity (token-weighted, fixed
non-overlapping windows, from the model's own loss; `evaluate.load("perplexity")` needs the Hub),
the pruned-vs-unpruned comparison, and size figures. The `evaluate` modules in `metrics/` wrap
these functions, so `evaluate.load(<module path>)` gives exactly what the CLI reports."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers.utils.logging import tqdm  # honours disable_progress_bar() and HF_HUB_DISABLE_PROGRESS_BARS


@torch.no_grad()
def negative_log_likelihood(model, token_ids: torch.Tensor, window: int = 256, batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over non-overlapping windows of
    `token_ids` (1-D); a final partial window is scored too."""
    ids = torch.as_tensor(token_ids).flatten()
    if ids.numel() < 2:
        raise ValueError(f"Perplexity needs at least 2 tokens, got {ids.numel()}.")
    device = next(model.parameters()).device
    windows = list(ids.split(window))
    if windows[-1].numel() < 2:
        windows.pop()
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="held-out perplexity", unit="batch", leave=False):
            group = windows[start:start + batch_size]
            for chunk in _same_length_groups(group):
                batch = torch.stack(chunk).to(device)
                logits = model(input_ids=batch, use_cache=False).logits.float()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
                total_nll += float(nll)
                total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total_nll, total_tokens


def perplexity(model, token_ids: torch.Tensor, window: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, every predicted token weighted equally."""
    nll, tokens = negative_log_likelihood(model, token_ids, window, batch_size)
    return math.exp(nll / tokens)


def text_perplexities(model, tokenizer, texts, window: int = 256, max_tokens: int | None = None,
                      batch_size: int = 8) -> dict:
    """Perplexity of each text (its first `max_tokens` tokens) and of all of them together
    (token-weighted). What `optimum-grape prune --evaluate` reports and the `grape_perplexity`
    evaluate module returns."""
    nlls, counts = [], []
    for text in texts:
        ids = text_token_ids(tokenizer, text)
        nll, tokens = negative_log_likelihood(model, ids[:max_tokens] if max_tokens else ids, window, batch_size)
        nlls.append(nll)
        counts.append(tokens)
    return {"perplexities": [math.exp(n / c) for n, c in zip(nlls, counts)],
            "perplexity": math.exp(sum(nlls) / sum(counts)), "num_tokens": counts}


def compare_perplexities(pruned, unpruned, max_ratio: float | None = None) -> dict:
    """Pruned against unpruned perplexities, item by item: each ratio, the worst one, their geometric
    mean, and (given `max_ratio`) whether every ratio stays within it. The `grape_comparison` module."""
    if len(pruned) != len(unpruned) or not pruned:
        raise ValueError(f"Need as many pruned as unpruned perplexities (>= 1), got {len(pruned)} and {len(unpruned)}.")
    ratios = [float(p) / float(u) for p, u in zip(pruned, unpruned)]
    out = {"ratios": ratios, "max_ratio": max(ratios),
           "mean_ratio": math.exp(sum(math.log(r) for r in ratios) / len(ratios))}
    if max_ratio is not None:
        out["within_threshold"] = out["max_ratio"] <= max_ratio
    return out


def _same_length_groups(windows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(w.numel(), []).append(w)
    return list(groups.values())


def text_token_ids(tokenizer, text: str) -> torch.Tensor:
    from ..calibration.data import encode_text

    return torch.tensor(encode_text(tokenizer, text), dtype=torch.long)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_bytes(folder) -> int:
    """Bytes of the weight files transformers loads from `folder`: its own, not those of a checkpoint
    kept in a sub-folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors") if p.is_file())


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference || pruned) of next-token distributions."""
    ref = torch.log_softmax(reference_logits.double(), dim=-1)
    new = torch.log_softmax(logits.double(), dim=-1)
    return float((ref.exp() * (ref - new)).sum(-1).mean())
