"""Build a testbed into its folder (see registry.py): `python benchmarks/testbeds/build.py NAME [args]`.

From-scratch testbeds are trained by `benchmarks/train_moe.py` with the arguments recorded in the
registry; `smollm2-moe` is converted and healed by `smollm2_moe.py`. Every builder is deterministic
and resumable (re-run the same command after an interruption with `--resume`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testbeds.registry import TESTBEDS, testbed  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TESTBEDS:
        print(f"usage: build.py {{{','.join(sorted(TESTBEDS))}}} [builder arguments]", file=sys.stderr)
        return 2
    name, extra = argv[0], argv[1:]
    if name == "smollm2-moe":
        from testbeds import smollm2_moe

        return smollm2_moe.main(extra)
    command = shlex.split(testbed(name).build_command)
    return subprocess.call([sys.executable, *command[1:], *extra], cwd=Path(__file__).resolve().parents[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
