"""`python -m optimum_grape.coverage [--out PATH] [--doc docs/families.md] [--only MODULE ...]`: run the
family matrix on the installed transformers, write PATH.json and PATH.md, optionally replace the
family table of docs/families.md. Exits 1 if a family fails (refusals are results, not failures)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .discover import fused_modules, other_moe_modules
from .matrix import run_matrix
from ..cli import QUIET_LOGGERS
from .report import render_markdown, summary, update_readme, write


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimum_grape.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/family_matrix"),
                        help="path without suffix for the .json and .md outputs")
    parser.add_argument("--doc", "--readme", dest="doc", type=Path,
                        help="replace the family table of this page (docs/families.md) with the result")
    parser.add_argument("--only", nargs="+", help="modeling folders to run (default: every MoE one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("optimum_grape").setLevel(logging.ERROR)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    fused = fused_modules()
    modules = args.only or fused + other_moe_modules()
    results = run_matrix(modules)
    json_path, md_path = write(results, fused, args.out)
    if args.doc:
        update_readme(args.doc, render_markdown(results, fused))
    counts = summary(results, fused)
    print(f"{counts['supported']}/{counts['fused_model_types']} fused-expert model types supported, "
          f"{counts['refused']} refused, {counts['failed']} failed; wrote {json_path} and {md_path}")
    for result in results:
        if result.status != "supported":
            print(f"  {result.status}: {result.module}: {result.reason}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
