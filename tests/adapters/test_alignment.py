"""Neuron alignment of fused experts (adapters/alignment.py): a neuron-permuted copy of an expert
computes the same function; aligned averaging must give that expert back, unaligned averaging must
not."""

import pytest
import torch

from factories import tiny_model
from optimum_grape.adapters import find_moe_layers
from optimum_grape.adapters.alignment import aligned_expert_tensors, neuron_axes
from optimum_grape.algorithms.alignment import paired_index


def permute_expert(layer, adapter, source: int, target: int, perm: torch.Tensor) -> None:
    """Make expert `target` a copy of `source` with its intermediate neurons permuted."""
    experts = layer.experts
    interleaved = not getattr(experts, "is_concatenated", True)
    with torch.no_grad():
        for name, (axis, paired) in neuron_axes(experts).items():
            tensor = getattr(experts, name)
            index = paired_index(perm, interleaved) if paired else perm
            tensor[target] = tensor[source].index_select(axis, index)
        if experts.has_bias:
            experts.down_proj_bias[target] = experts.down_proj_bias[source]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_aligned_merge_of_a_permuted_copy_is_exact(family):
    model = tiny_model(family)
    adapter, layers = find_moe_layers(model)
    layer = layers[0]
    intermediate = layer.experts.down_proj.shape[1 if layer.experts.is_transposed else 2]
    perm = torch.randperm(intermediate, generator=torch.Generator().manual_seed(1))
    permute_expert(layer, adapter, source=0, target=1, perm=perm)
    x = torch.randn(20, model.config.hidden_size)
    want = adapter.run_experts(layer, x, [0])[0]
    assert torch.allclose(adapter.run_experts(layer, x, [1])[0], want, atol=1e-5)  # same function
    clusters = [[0, 1]] + [[e] for e in range(2, layer.num_experts)]
    weights = [[0.5, 0.5]] + [[1.0]] * (layer.num_experts - 2)
    aligned = aligned_expert_tensors(layer.experts, clusters, weights)
    for name, rows in aligned.items():
        assert set(rows) == {1}, name  # only the averaged member is re-ordered
        assert torch.allclose(rows[1], getattr(layer.experts, name)[0], atol=1e-6), name
    adapter.apply_clusters(layer, clusters, weights, weights, align=True)
    assert torch.allclose(adapter.run_experts(layer, x, [0])[0], want, atol=1e-5)


def test_unaligned_merge_of_a_permuted_copy_is_not_the_expert():
    model = tiny_model("mixtral")
    adapter, layers = find_moe_layers(model)
    layer = layers[0]
    perm = torch.randperm(layer.experts.down_proj.shape[2], generator=torch.Generator().manual_seed(1))
    permute_expert(layer, adapter, 0, 1, perm)
    x = torch.randn(20, model.config.hidden_size)
    want = adapter.run_experts(layer, x, [0])[0]
    clusters = [[0, 1]] + [[e] for e in range(2, 8)]
    weights = [[0.5, 0.5]] + [[1.0]] * 6
    adapter.apply_clusters(layer, clusters, weights, weights, align=False)
    assert not torch.allclose(adapter.run_experts(layer, x, [0])[0], want, atol=1e-2)


def test_reused_alignments_match_each_member_once_and_never_after_its_tensors_change(monkeypatch):
    """Planning applies many candidate plans sharing clusters: inside `reused_alignments` a weight-only
    match is computed once per (tensors, representative, member); merged (new) tensors never reuse it."""
    from optimum_grape.adapters import alignment

    model = tiny_model("mixtral")
    _, layers = find_moe_layers(model)
    experts = layers[0].experts
    calls, original = [], alignment.match_unit_neurons
    monkeypatch.setattr(alignment, "match_unit_neurons", lambda *a, **k: calls.append(1) or original(*a, **k))
    clusters, weights = [[0, 1, 2]] + [[e] for e in range(3, 8)], [[0.5, 0.25, 0.25]] + [[1.0]] * 5
    fresh = aligned_expert_tensors(experts, clusters, weights)
    assert len(calls) == 2
    with alignment.reused_alignments():
        first = aligned_expert_tensors(experts, clusters, weights)
        again = aligned_expert_tensors(experts, clusters, weights)
        assert len(calls) == 4  # the second call computed nothing
        for name in fresh:
            assert all(torch.equal(fresh[name][m], first[name][m]) and torch.equal(first[name][m], again[name][m])
                       for m in fresh[name])
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach().flip(0))  # new weights
        aligned_expert_tensors(experts, clusters, weights)
        assert len(calls) == 6
