"""Expert-to-expert similarity from the outputs of every expert on the SAME tokens: pure functions.

`outputs` is [E, T, H]: expert e's output on token t. Each function returns a symmetric [E, E]
float64 matrix, larger = more alike (GRAPE works in similarity form: docs/methods.md, gap (d)).

`merge_cost` also uses the router's gates on those tokens, so it knows how much each expert is used:
it is the measure GRAPE's default plans with (docs/methods.md, "Merge cost").
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


def relative_merge_cost(outputs: torch.Tensor, gates: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Expected error that merging experts i and j adds to the layer's output, relative to the
    layer's output energy: [E, E], symmetric, zero diagonal.

    Merging i and j into m = w_i f_i + w_j f_j (w from their gate mass on these tokens) changes the
    layer's output on token t by e_ij(t) = (g_i(t) w_j - g_j(t) w_i) (f_i(t) - f_j(t)), with g the
    gates the router gave (zero where an expert was not selected). This is the error REAP (arXiv
    2510.13999, Sec. 3) shows merging cannot avoid: it grows with gate mass times the squared
    distance of the outputs, so rarely used or near-identical pairs are cheap, and a scale-invariant
    similarity such as CKA, blind to both, is not. cost_ij = mean_t ||e_ij(t)||^2 / mean_t ||y(t)||^2
    with y(t) = sum_e g_e(t) f_e(t), which makes costs comparable across layers.

    Expanding the square leaves sums over tokens of g_i^2 d_ij and g_i g_j d_ij, where
    d_ij = n_i + n_j - 2 <f_i, f_j> (n = squared norms). The dot products are needed only where g_i is
    non-zero: for each token, between its k routed experts and all E, a [k, H] x [H, E] product
    per token ([T, k, E] in all), k/E of the dense [E, T*H] x [T*H, E] products (1/16 for a
    Qwen3-MoE layer); accumulated over token chunks so memory stays O(E * chunk * H).
    """
    num_experts, num_tokens, _ = outputs.shape
    g = gates.double().T  # [E, T]
    routed = int((g != 0).sum(0).max()) if num_tokens else 0  # experts with a gate per token, at most
    n = torch.zeros(num_experts, num_tokens, dtype=torch.float64)  # squared output norms
    cross_g2 = torch.zeros(num_experts, num_experts, dtype=torch.float64)  # sum_t g_i^2 <f_i, f_j>
    cross_gg = torch.zeros_like(cross_g2)  # sum_t g_i g_j <f_i, f_j>
    energy = 0.0
    for start in range(0, num_tokens, chunk):
        f = outputs[:, start:start + chunk].double()  # [E, c, H]
        gc = g[:, start:start + chunk]  # [E, c]
        n[:, start:start + chunk] = (f * f).sum(-1)
        energy += float(((gc[:, :, None] * f).sum(0) ** 2).sum())
        if routed == 0:
            continue
        per_token = f.transpose(0, 1)  # [c, E, H]
        # [c, k]: each token's routed experts (padded with unrouted ones, whose zero gate adds nothing)
        chosen = (gc.T != 0).to(torch.uint8).topk(routed, dim=1).indices
        gate = gc.T.gather(1, chosen)
        picked = per_token.gather(1, chosen[:, :, None].expand(-1, -1, f.shape[-1]))  # [c, k, H]
        dots = torch.bmm(picked, per_token.transpose(1, 2))  # [c, k, E]: <f_i, f_j>, i routed
        rows = chosen.flatten()
        cross_g2.index_add_(0, rows, ((gate * gate)[:, :, None] * dots).flatten(0, 1))
        cross_gg.index_add_(0, rows, (gate[:, :, None] * dots * gc.T[:, None, :]).flatten(0, 1))
    g2 = g * g
    a = (g2 * n).sum(1)[:, None] + g2 @ n.T - 2 * cross_g2  # sum_t g_i^2 d_ij
    b = (g * n) @ g.T + g @ (g * n).T - 2 * cross_gg  # sum_t g_i g_j d_ij
    mass = g.sum(1)
    total = (mass[:, None] + mass[None, :]).clamp_min(1e-30)
    w_i, w_j = mass[:, None] / total, mass[None, :] / total  # w_i of pair (i, j)
    cost = (w_j ** 2 * a - 2 * w_i * w_j * b + w_i ** 2 * a.T) / num_tokens
    cost = cost.clamp_min(0.0)
    cost.fill_diagonal_(0.0)
    return (cost + cost.T) / 2 / max(energy / num_tokens, 1e-30)


# The measures a config may name (GrapeConfig.similarity); larger = more alike in every one.
SIMILARITIES = ("merge_cost", "cka", "cosine", "mse")
SIMILARITY_FUNCTIONS = {"cka": linear_cka, "cosine": mean_cosine, "mse": negative_mse}
# Measures that need the router's gates on the sampled tokens besides the experts' outputs.
GATED_MEASURES = {"merge_cost": lambda outputs, gates: -relative_merge_cost(outputs, gates)}


def expert_similarity(outputs: torch.Tensor, measure: str, gates: torch.Tensor | None = None) -> torch.Tensor:
    """[E, E] similarity (larger = more alike). For "merge_cost" it is minus the relative merge cost."""
    sim = GATED_MEASURES[measure](outputs, gates) if measure in GATED_MEASURES else SIMILARITY_FUNCTIONS[measure](outputs)
    return (sim + sim.T) / 2


def cost_kernel(similarities: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Turn minus-relative-merge-costs into GRAPE similarities in (0, 1]: D_ij = exp(-c_ij / tau),
    tau = the median cost over every pair of every layer (one scale for the whole model).

    GRAPE's greedy needs POSITIVE similarities: it subtracts a merged pair's similarity from the
    layer's redundancy R^l, so with negative ones (-cost, -MSE) every merge makes a layer look more
    redundant and the budget piles into it (the `[8, 2, 8, 2, 8, 8]` plans of the first benchmark).
    With the kernel, near-free merges count about 1, costly ones about 0, and R^l is a soft count of
    the layer's cheap pairs."""
    costs = {l: (-s.double()).clamp_min(0.0) for l, s in similarities.items()}
    pairs = torch.cat([c[~torch.eye(c.shape[0], dtype=torch.bool)] for c in costs.values()])
    tau = float(pairs.median()) if pairs.numel() else 1.0
    tau = tau if tau > 0 else 1.0
    return {l: torch.exp(-c / tau) for l, c in costs.items()}
