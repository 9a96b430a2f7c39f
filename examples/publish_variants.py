"""Publish pruned variants of a base model: every method x ratio is pruned, evaluated against the
base, refused if its perplexity ratio exceeds --max-ppl-ratio, and pushed with the token in
HF_TOKEN. --dry-run (the default here) writes the folders and `publish_manifest.json` instead.
This is what `.github/workflows/publish-variants.yml` runs, one matrix cell at a time.

    python examples/publish_variants.py --model path/to/model --repo-prefix me/model --methods grape,frequency
    HF_TOKEN=... python examples/publish_variants.py --model path/to/model --repo-prefix me/model --push
"""

import argparse
import json
from pathlib import Path

from optimum_grape.cli import main as optimum_grape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model folder or cached Hub id ('default': shipped model)")
    parser.add_argument("--repo-prefix", default="me/tiny-moe")
    parser.add_argument("--methods", default="grape,frequency")
    parser.add_argument("--ratios", default="0.25")
    parser.add_argument("--max-ppl-ratio", default="1.5")
    parser.add_argument("--work-dir", default="grape-variants")
    parser.add_argument("--push", action="store_true", help="really upload (needs HF_TOKEN)")
    parser.add_argument("--num-samples", default="64")
    parser.add_argument("--eval-tokens", default="8192")
    args = parser.parse_args(argv)

    status = optimum_grape(["publish", args.model, "--methods", args.methods, "--ratios", args.ratios,
                            "--repo-prefix", args.repo_prefix, "--max-ppl-ratio", args.max_ppl_ratio,
                            "--work-dir", args.work_dir, "--num-samples", args.num_samples,
                            "--eval-tokens", args.eval_tokens, "--overwrite"] + ([] if args.push else ["--dry-run"]))
    manifest = json.loads((Path(args.work_dir) / "publish_manifest.json").read_text())
    for v in manifest["variants"]:
        print(f"{v['variant']}: {v['status']} ({len(v.get('files', []))} files)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
