"""Turning clusters into experts (algorithms/merging.py), pure: weighted rows, cluster weights and
order."""

import torch

from optimum_grape.algorithms.merging import cluster_weights, combine_rows, order_clusters


def test_combine_rows_identity_and_weighted_average():
    t = torch.randn(4, 3, 2)
    assert torch.equal(combine_rows(t, [[0], [1], [2], [3]], [[1.0]] * 4), t)
    merged = combine_rows(t, [[1, 3], [0], [2]], [[0.25, 0.75], [1.0], [1.0]])
    assert torch.allclose(merged[0], 0.25 * t[1] + 0.75 * t[3], atol=1e-6)


def test_cluster_weights_and_order():
    freq = torch.tensor([10.0, 30.0, 0.0, 60.0])
    clusters = order_clusters([[0, 1, 3], [2]], freq)
    assert clusters == [[2], [3, 0, 1]]
    assert cluster_weights(clusters, freq, "weighted") == [[1.0], [0.6, 0.1, 0.3]]
    assert cluster_weights(clusters, freq, "drop") == [[1.0], [1.0, 0.0, 0.0]]
