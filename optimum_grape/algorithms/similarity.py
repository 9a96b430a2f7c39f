"""Expert-to-expert similarity from the outputs of every expert on the SAME tokens: pure functions.

`outputs` is [E, T, H]: expert e's output on token t. Each function returns a symmetric [E, E]
float64 matrix, larger = more alike (GRAPE works in similarity form: RESEARCH.md gap (d)).
"""

from __future__ import annotations

import torch


def linear_cka(outputs: torch.Tensor) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) between experts, as in DEK (arXiv 2407.09590).

    CKA(X, Y) = <K_X, K_Y>_F / (||K_X||_F ||K_Y||_F) with K = Xc Xc^T the token Gram matrix of the
    column-centred outputs. Computed one expert at a time so memory is E*T^2, not E*T*H*H.
    """
    grams = []
    for x in outputs.double():
        x = x - x.mean(dim=0, keepdim=True)
        gram = (x @ x.T).flatten()
        grams.append(gram / gram.norm().clamp_min(1e-30))
    grams = torch.stack(grams)
    return (grams @ grams.T).clamp(-1.0, 1.0)


def mean_cosine(outputs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine between two experts' outputs on that token."""
    unit = torch.nn.functional.normalize(outputs.double(), dim=-1)
    return torch.einsum("ith,jth->ij", unit, unit) / outputs.shape[1]


def negative_mse(outputs: torch.Tensor) -> torch.Tensor:
    """Minus the mean squared difference between two experts' outputs (0 for identical experts)."""
    x = outputs.double().flatten(1)
    sq = (x * x).sum(dim=1)
    dist = sq[:, None] + sq[None, :] - 2 * x @ x.T
    return -(dist.clamp_min(0.0) / outputs.shape[1] / outputs.shape[2])


SIMILARITY_FUNCTIONS = {"cka": linear_cka, "cosine": mean_cosine, "mse": negative_mse}


def expert_similarity(outputs: torch.Tensor, measure: str) -> torch.Tensor:
    sim = SIMILARITY_FUNCTIONS[measure](outputs)
    return (sim + sim.T) / 2
