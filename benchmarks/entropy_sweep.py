"""Where GRAPE's global budget goes as the entropy safeguard tightens (gamma = entropy_tolerance).

    python benchmarks/entropy_sweep.py

GRAPE global on the embedded model at 25% removed, for each similarity measure and gamma:
experts kept per layer, allocation entropy, restarts, and held-out perplexity (all domains,
token-weighted) as a ratio to the unpruned model. gamma = 0 forces a round-robin (a layer freezes
after every merge); gamma = 1 never freezes. Writes results/entropy_sweep.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, heldout_ids, load_default, perplexities  # noqa: E402

from optimum_grape import GrapeConfig, GrapePruner  # noqa: E402

GAMMAS = (0.0, 0.02, 0.05, 0.1, 0.2, 1.0)


def main() -> None:
    base, tok = load_default()
    ids = heldout_ids(tok, 16384)
    reference = perplexities(base, ids)["all"]
    records = []
    for measure in ("cka", "mse"):
        stats = GrapePruner(GrapeConfig(pruning_ratio=0.25, similarity=measure)).calibrate(base, None, tok)
        for gamma in GAMMAS:
            pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, similarity=measure, entropy_tolerance=gamma))
            plan = pruner.plan(stats)
            model = copy.deepcopy(base)
            pruner.apply(model, plan)
            ppl = perplexities(model, ids)["all"]
            rec = {"similarity": measure, "entropy_tolerance": gamma,
                   "experts_per_layer": list(plan.experts_per_layer.values()),
                   "restarts": plan.metadata["restarts"], "entropy_after": plan.metadata["entropy_after"],
                   "entropy_before": plan.metadata["entropy_before"], "perplexity": ppl,
                   "perplexity_ratio": ppl / reference}
            records.append(rec)
            print(f"{measure:4s} gamma {gamma:4.2f}  kept {rec['experts_per_layer']}  restarts {rec['restarts']:3d}  "
                  f"entropy {rec['entropy_after']:.3f}/{rec['entropy_before']:.3f}  ppl x{rec['perplexity_ratio']:.3f}",
                  flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "entropy_sweep.json").write_text(json.dumps({"unpruned_perplexity": reference, "runs": records},
                                                          indent=1) + "\n")


if __name__ == "__main__":
    main()
