"""`cprune`: C-Prune, cluster-driven expert pruning (arXiv 2504.07807).

1. Expert embedding phi_i = mean output of expert i on calibration tokens of its layer.
2. Affinity A_ij = sigmoid(alpha * cos(phi_i, phi_j)).
3. Layer-wise clustering: average-linkage agglomeration on A (join argmax A_uv; the joined row is
   the size-weighted mean) spends `layer_fraction` of the budget, spread evenly over layers.
4. Global cluster pruning: the rest of the budget is spent model-wide, always joining the pair of
   clusters with the highest linkage affinity in ANY layer (affinities are on one sigmoid scale, so
   they rank across layers; the paper's "unified importance score" is not specified further).
5. Each cluster becomes theta_k = sum_i w_i theta_i, w = softmax(gamma * A_{i,rep}) (merge='affinity');
   its router row is the mean of its members' rows (router='mean').
The paper gives no values for alpha and gamma; ours (method_kwargs) are stated in docs/methods.md.
Its released code splits the budget 10% per layer then 10% globally: layer_fraction = 0.5.
"""

from __future__ import annotations

import torch

from ..algorithms.budget import uniform_removals
from ..algorithms.selection import AverageLinkage
from .base import Hyperparameter, PruningMethod

DEFAULTS = {"alpha": 5.0, "gamma": 5.0, "layer_fraction": 0.5}


def affinity(mean_output: torch.Tensor, alpha: float) -> torch.Tensor:
    unit = torch.nn.functional.normalize(mean_output.double(), dim=-1)
    return torch.sigmoid(alpha * (unit @ unit.T))


class CPruneMethod(PruningMethod):
    name = "cprune"
    needs = frozenset({"mean_output"})
    default_allocation = "global"
    default_merge = "affinity"
    merges = ("affinity", "weighted", "saliency", "drop")
    default_router = "mean"
    reference = "C-Prune, arXiv 2504.07807"
    hyperparameters = {"alpha": Hyperparameter("affinity sharpness, A = sigmoid(alpha cos)", 0.0),
                       "gamma": Hyperparameter("merge weights softmax(gamma A)", 0.0),
                       "layer_fraction": Hyperparameter("share of the budget spent layer by layer", 0.0, 1.0)}

    def params(self, config) -> dict:
        return {**DEFAULTS, **{k: v for k, v in config.method_kwargs.items() if k in DEFAULTS}}

    def cluster(self, stats, budget, floors, allocation, config):
        p = self.params(config)
        num = stats.num_experts
        states = {l: AverageLinkage(affinity(s.mean_output, p["alpha"])) for l, s in stats.layers.items()}
        layer_budget = budget if allocation == "uniform" else int(round(p["layer_fraction"] * budget))
        for l, r in uniform_removals(num, floors, layer_budget).items() if layer_budget else ():
            for _ in range(r):
                states[l].join(*states[l].best()[1:])
        for _ in range(budget - layer_budget):  # global stage
            open_layers = [l for l, st in states.items() if len(st.clusters) > floors[l]]
            score, layer = max((states[l].best()[0], -l) for l in open_layers)
            states[-layer].join(*states[-layer].best()[1:])
        meta = {"cprune": {**p, "layer_budget": layer_budget, "global_budget": budget - layer_budget}}
        return {l: st.result() for l, st in states.items()}, meta

    def merge_weights(self, layer, stats, clusters, mode, config):
        if mode != "affinity":
            return None
        p = self.params(config)
        aff = affinity(stats.layers[layer].mean_output, p["alpha"])
        return [torch.softmax(torch.tensor([p["gamma"] * float(aff[m, c[0]]) for m in c], dtype=torch.float64),
                              dim=0).tolist() for c in clusters]
