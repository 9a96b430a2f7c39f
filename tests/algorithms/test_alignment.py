"""Aligning hidden neurons before averaging (algorithms/alignment.py), pure: matching recovers a
permutation; paired (gate/up) index layouts."""

import torch

from optimum_grape.algorithms.alignment import match_neurons, paired_index


def test_match_neurons_recovers_a_permutation():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 10, generator=gen)
    perm = torch.randperm(16, generator=gen)
    member = torch.empty_like(ref)
    member[perm] = ref  # member neuron perm[k] is reference neuron k
    assert torch.equal(match_neurons(ref, member), perm)


def test_paired_index_layouts():
    perm = torch.tensor([2, 0, 1])
    assert paired_index(perm, interleaved=False).tolist() == [2, 0, 1, 5, 3, 4]
    assert paired_index(perm, interleaved=True).tolist() == [4, 5, 0, 1, 2, 3]


def test_matching_unit_rows_is_match_neurons_to_the_bit():
    """The memory-lean path (rows normalised in place, the score negated in place) solves the same
    problem on the same values as normalising copies and maximising, with activations too."""
    from scipy.optimize import linear_sum_assignment

    from optimum_grape.algorithms.alignment import match_unit_neurons, unit_rows_

    gen = torch.Generator().manual_seed(1)
    ref, member = torch.randn(64, 40, generator=gen), torch.randn(64, 40, generator=gen)
    ref_acts, member_acts = torch.randn(64, 30, generator=gen), torch.randn(64, 30, generator=gen)
    unit = torch.nn.functional.normalize
    torch.testing.assert_close(unit_rows_(ref.double().clone()), unit(ref.double(), dim=-1), rtol=0, atol=0)
    for acts in ((None, None), (ref_acts, member_acts)):
        score = unit(ref.double(), dim=-1) @ unit(member.double(), dim=-1).T
        if acts[0] is not None:
            centred = [x.double() - x.double().mean(dim=1, keepdim=True) for x in acts]
            score = (score + unit(centred[0], dim=-1) @ unit(centred[1], dim=-1).T) / 2
        expected = torch.as_tensor(linear_sum_assignment(score.numpy(), maximize=True)[1])
        lean = match_unit_neurons(unit_rows_(ref.double().clone()), unit_rows_(member.double().clone()), *acts)
        assert torch.equal(lean, expected) and torch.equal(match_neurons(ref, member, *acts), expected)
