"""Expert similarity (algorithms/similarity.py), pure: identical experts are maximally similar, CKA
is invariant to scale and rotation, the merge cost matches its definition token by token and knows
usage, the cost kernel gives positive similarities."""

import itertools
import math

import pytest
import torch

from optimum_grape.algorithms.similarity import cost_kernel, expert_similarity, relative_merge_cost


@pytest.mark.parametrize("measure", ["cka", "cosine", "mse"])
def test_identical_experts_are_maximally_similar(measure):
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(4, 50, 16, generator=gen)
    outputs[2] = outputs[0]
    sim = expert_similarity(outputs, measure)
    assert torch.allclose(sim, sim.T)
    off = sim.clone().fill_diagonal_(-math.inf)
    assert divmod(int(off.argmax()), 4) in [(0, 2), (2, 0)]
    assert float(sim[0, 2]) == pytest.approx(float(sim[0, 0]), abs=1e-9)


def test_cka_is_invariant_to_scale_and_rotation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    outputs = torch.stack([x, 3.0 * x @ q, torch.randn(60, 8, generator=gen)])
    sim = expert_similarity(outputs, "cka")
    assert float(sim[0, 1]) == pytest.approx(1.0, abs=1e-9)
    assert float(sim[0, 2]) < 0.5


# -- the merge cost ---------------------------------------------------------------------------------
def random_gates(tokens, experts, top_k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gates = torch.zeros(tokens, experts)
    for t in range(tokens):
        chosen = torch.randperm(experts, generator=gen)[:top_k]
        w = torch.rand(top_k, generator=gen)
        gates[t, chosen] = w / w.sum()
    return gates


@pytest.mark.parametrize("experts,top_k", [(5, 2), (12, 4)])
def test_merge_cost_matches_its_definition_token_by_token(experts, top_k):
    gen = torch.Generator().manual_seed(0)
    outputs, gates = torch.randn(experts, 37, 6, generator=gen), random_gates(37, experts, top_k)
    gates[3, gates[3].nonzero()[0]] = 0.0  # a token with fewer routed experts than the others
    cost = relative_merge_cost(outputs, gates, chunk=8)  # several chunks
    mass = gates.double().sum(0)
    out = outputs.double()
    energy = ((gates.double().T[:, :, None] * out).sum(0) ** 2).sum(-1).mean()
    for i, j in itertools.permutations(range(experts), 2):
        w_i = mass[i] / (mass[i] + mass[j])
        err = (gates[:, i].double() * (1 - w_i) - gates[:, j].double() * w_i)[:, None] * (out[i] - out[j])
        assert float(cost[i, j]) == pytest.approx(float((err ** 2).sum(-1).mean() / energy), rel=1e-6)
    assert torch.equal(cost, cost.T) and float(cost.diagonal().abs().max()) == 0.0


def test_merge_cost_knows_usage_and_identity():
    gen = torch.Generator().manual_seed(1)
    outputs = torch.randn(4, 64, 8, generator=gen)
    outputs[1] = outputs[0]  # identical experts: merging them changes nothing
    outputs[3] = outputs[2] + 3.0  # the same distance as 2-3 but ...
    gates = random_gates(64, 4)
    gates[:, 3] *= 0.01  # ... expert 3 is almost never given weight
    cost = relative_merge_cost(outputs, gates)
    assert float(cost[0, 1]) < 1e-12
    rare = relative_merge_cost(outputs, gates)[2, 3]
    gates[:, 3] *= 100
    assert float(rare) < 0.1 * float(relative_merge_cost(outputs, gates)[2, 3])


def test_cost_kernel_gives_positive_similarities():
    sims = {0: -torch.tensor([[0.0, 0.1], [0.1, 0.0]]), 1: -torch.tensor([[0.0, 0.4], [0.4, 0.0]])}
    kernel = cost_kernel(sims)
    assert all(float(k.min()) > 0 and float(k.max()) <= 1 for k in kernel.values())
    assert float(kernel[0][0, 1]) > float(kernel[1][0, 1])
