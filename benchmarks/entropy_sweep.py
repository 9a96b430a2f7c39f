"""Where GRAPE's global budget goes as the entropy safeguard tightens (gamma = entropy_tolerance).

    python benchmarks/entropy_sweep.py --testbed default

GRAPE global at 25% removed, for the default preset (merge cost rescaled by each layer's measured
sensitivity, layer cap 2x) and the paper preset (CKA, no cap), for each gamma: experts kept per
layer, allocation entropy, restarts, the held-aside KL that `entropy_tolerance='auto'` ranks
candidates by, and held-out perplexity (all domains, token-weighted) as a ratio to the unpruned
model. gamma = 0 forces a round-robin (a layer freezes after every merge); gamma = 1 never
freezes. The last record per preset is what 'auto' chose. Writes results/<testbed>/entropy_sweep.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_testbed_argument, perplexities, results_dir  # noqa: E402
from testbeds.registry import load_testbed  # noqa: E402

from optimum_grape import GrapeConfig, GrapePruner  # noqa: E402
from optimum_grape.planning.scoring import score_plans  # noqa: E402

GAMMAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_testbed_argument(parser)
    parser.add_argument("--ratio", type=float, default=0.25)
    args = parser.parse_args()
    base, tok = load_testbed(args.testbed)
    reference = perplexities(base, tok, 16384)["all"]
    records = []
    for preset in ("default", "paper"):
        calibrator = GrapePruner(GrapeConfig(pruning_ratio=args.ratio, preset=preset))
        stats = calibrator.calibrate(base, None, tok)
        for gamma in (*GAMMAS, "auto"):
            pruner = GrapePruner(GrapeConfig(pruning_ratio=args.ratio, preset=preset, entropy_tolerance=gamma))
            pruner.selection_batches = calibrator.selection_batches
            plan = pruner.plan(stats, base)
            kl = score_plans(base, [plan], calibrator.selection_batches)[0]
            model = copy.deepcopy(base)
            pruner.apply(model, plan)
            ppl = perplexities(model, tok, 16384)["all"]
            rec = {"preset": preset, "entropy_tolerance": gamma, "experts_per_layer": list(plan.experts_per_layer.values()),
                   "restarts": plan.metadata.get("restarts"), "entropy_after": plan.metadata.get("entropy_after"),
                   "chosen": plan.metadata.get("selection", {}).get("chosen"), "held_aside_kl": kl,
                   "perplexity": ppl, "perplexity_ratio": ppl / reference}
            records.append(rec)
            print(f"{preset:7s} gamma {str(gamma):5s} kept {rec['experts_per_layer']}  KL {kl:.4f}  "
                  f"ppl x{rec['perplexity_ratio']:.3f}" + (f"  (chose {rec['chosen']})" if rec["chosen"] else ""),
                  flush=True)
    out = results_dir(args.testbed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "entropy_sweep.json").write_text(json.dumps(
        {"testbed": args.testbed, "ratio": args.ratio, "unpruned_perplexity": reference, "runs": records,
         "command": " ".join(["python", *sys.argv])}, indent=1) + "\n")


if __name__ == "__main__":
    main()
