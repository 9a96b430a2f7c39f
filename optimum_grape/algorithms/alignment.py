"""Aligning the hidden neurons of experts before averaging them: pure functions.

An expert's intermediate neurons can be permuted without changing what it computes, so two experts
trained apart rarely have neuron k doing the same job. Averaging their weights as they are mixes
unrelated neurons (and, as our benchmark shows, can wreck a merged expert). MC-SMoE aligns experts
before merging; we use weight matching (as in Git Re-Basin): each member's neurons are assigned
one-to-one to the representative's by maximising the cosine similarity of their weights (gate row,
up row and down column together), with the Hungarian algorithm.
"""

from __future__ import annotations

import torch


def match_neurons(reference: torch.Tensor, member: torch.Tensor, reference_acts: torch.Tensor | None = None,
                  member_acts: torch.Tensor | None = None) -> torch.Tensor:
    """Permutation `perm` [I] such that member neuron perm[k] takes the place of reference neuron k.

    `reference` and `member` are [I, F]: one feature row (all weights touching the neuron) per neuron.
    With `*_acts` [I, T] (each neuron's activation on the same calibration tokens), neurons are matched
    on the mean of two cosines: of their weights and of their centred activations (REAM, arXiv
    2604.04356, aligns on activations plus weights: two neurons can have unlike weights yet fire alike
    on the data that matters)."""
    return match_unit_neurons(unit_rows_(reference.double().clone()), unit_rows_(member.double().clone()),
                              reference_acts, member_acts)


def unit_rows_(features: torch.Tensor) -> torch.Tensor:
    """`features` (float64, owned by the caller) with each row scaled to unit length, in place: the
    values `torch.nn.functional.normalize` returns, without a second [I, F] copy."""
    return torch.nn.functional.normalize(features, dim=-1, out=features)


def match_unit_neurons(reference: torch.Tensor, member: torch.Tensor, reference_acts: torch.Tensor | None = None,
                       member_acts: torch.Tensor | None = None) -> torch.Tensor:
    """`match_neurons` on weight features already made unit rows by `unit_rows_`: what merging a large
    expert holds at once is then the two feature matrices and one [I, I] score (each a Mixtral-sized
    expert's 50 MB and 33 MB), where normalising copies and the solver's own negated copy of the
    score doubled it."""
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize costs 0.25 s to import

    score = reference @ member.T
    if reference_acts is not None and member_acts is not None:
        centred = [unit_rows_(x.double() - x.double().mean(dim=1, keepdim=True)) for x in (reference_acts, member_acts)]
        score = (score + centred[0] @ centred[1].T) / 2
    # maximize=True would negate a copy of the score; negating it here, in place, is the same problem.
    _, cols = linear_sum_assignment(score.neg_().cpu().numpy())
    return torch.as_tensor(cols, dtype=torch.long)


def paired_index(perm: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Index into a fused gate/up axis of length 2I for a permutation of the I neurons."""
    if interleaved:
        return torch.stack([2 * perm, 2 * perm + 1], dim=1).flatten()
    return torch.cat([perm, perm + perm.numel()])
