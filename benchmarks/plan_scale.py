"""Planning at production scale, without weights: each real config of tests/fixtures/configs is
instantiated on the meta device, GRAPE (Algorithm 1) plans a 25% global cut from synthetic
similarity matrices with the adapter's per-layer floors, and the plan is applied to the meta model
(so routing constraints, e.g. DeepSeek-V3 groups, are exercised). Prints the time per config and
writes benchmarks/results/plan_scale.json.

    python benchmarks/plan_scale.py [--ratio 0.25] [--out benchmarks/results/plan_scale.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "tests" / "fixtures" / "configs"
NAMES = ("mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-20b", "gpt-oss-120b")


def load_config(name: str):
    from transformers import CONFIG_MAPPING

    data = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def meta_model(name: str):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_config(name))


def synthetic_similarities(num_experts: dict[int, int], seed: int = 0, dim: int = 64) -> dict[int, torch.Tensor]:
    """Cosine similarities of random expert embeddings sharing a per-layer common direction, so
    redundancy grows with depth (as GRAPE Sec. 3 observes) with noise between layers."""
    gen = torch.Generator().manual_seed(seed)
    sims, depth = {}, max(1, len(num_experts) - 1)
    for rank, (layer, n) in enumerate(sorted(num_experts.items())):
        shared = 0.3 + 0.9 * rank / depth + 0.2 * torch.rand((), generator=gen)
        emb = torch.randn(n, dim, generator=gen) + shared * torch.randn(1, dim, generator=gen)
        emb = torch.nn.functional.normalize(emb.double(), dim=-1)
        sims[layer] = emb @ emb.T
    return sims


def plan_at_scale(name: str, ratio: float = 0.25, seed: int = 0) -> dict:
    """Build `name` on meta, plan GRAPE globally, apply to the meta model; returns counts and timings."""
    from optimum_grape import GrapeConfig, PruningPlan
    from optimum_grape.adapters import find_moe_layers
    from optimum_grape.algorithms.grape import grape_global_merge
    from optimum_grape.algorithms.merging import order_clusters
    from optimum_grape.merging.apply import apply_plan

    start = time.perf_counter()
    model = meta_model(name)
    build_s = time.perf_counter() - start
    adapter, layers = find_moe_layers(model)
    num_experts = {l.index: l.num_experts for l in layers}
    floors = {l.index: adapter.layer_floor(l) for l in layers}
    budget = round(ratio * sum(num_experts.values()))
    sims = synthetic_similarities(num_experts, seed)
    start = time.perf_counter()
    specs = {l.index: adapter.routing_spec(l, model.config) for l in layers}
    groups = {l: (s.n_group, s.min_grouped) for l, s in specs.items() if s.n_group > 1}
    result = grape_global_merge(sims, floors, budget, GrapeConfig(pruning_ratio=ratio, preset="paper").entropy_tolerance, groups)
    plan_s = time.perf_counter() - start
    plan = PruningPlan(clusters={l: order_clusters(c, None) for l, c in result.clusters.items()},
                       num_experts_before=num_experts, method="grape")
    start = time.perf_counter()
    apply_plan(model, plan)
    apply_s = time.perf_counter() - start
    return {"name": name, "model_type": model.config.model_type, "moe_layers": len(layers),
            "experts_per_layer_before": sorted(set(num_experts.values())), "floors": sorted(set(floors.values())),
            "budget": budget, "removed": plan.num_removed, "restarts": result.restarts,
            "experts_per_layer": {str(k): v for k, v in plan.experts_per_layer.items()},
            "routing_overrides": plan.metadata.get("routing_overrides", {}),
            "build_meta_s": round(build_s, 3), "plan_s": round(plan_s, 3), "apply_meta_s": round(apply_s, 3),
            "model": model, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_scale.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'config':<16}{'MoE layers':>11}{'experts':>9}{'removed':>9}{'fallbacks':>10}{'meta build s':>14}"
          f"{'plan s':>9}{'apply s':>9}")
    for name in NAMES:
        row = plan_at_scale(name, args.ratio)
        row.pop("model"), row.pop("plan")
        rows.append(row)
        print(f"{name:<16}{row['moe_layers']:>11}{row['experts_per_layer_before'][0]:>9}{row['removed']:>9}"
              f"{len(row['routing_overrides']):>10}{row['build_meta_s']:>14.2f}{row['plan_s']:>9.2f}"
              f"{row['apply_meta_s']:>9.2f}")
    import platform

    meta = {"ratio": args.ratio, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "similarities": "synthetic (seed 0)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
