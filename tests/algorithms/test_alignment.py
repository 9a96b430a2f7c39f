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
