"""`optimum-grape`: prune an MoE checkpoint from the command line, inspect a pruned one, score it
with lm-evaluation-harness, or publish pruned variants.

    optimum-grape prune default --output pruned --ratio 0.25 --evaluate
    optimum-grape prune ./Mixtral-8x7B --output ./mixtral-grape-25 --ratio 0.25 --dataset calib.txt
    optimum-grape inspect ./mixtral-grape-25
    optimum-grape inspect --verify ./mixtral-grape-25
    optimum-grape methods
    optimum-grape eval ./mixtral-grape-25 --tasks hellaswag,piqa
    optimum-grape publish default --methods grape,frequency --ratios 0.25 --repo-prefix me/tiny --dry-run out/

Each command is one entry of COMMANDS (its arguments and its function), which `optimum-cli grape`
reuses (optimum/commands/register/grape.py).

One module per command (`prune.py`, `inspect.py`, `methods.py`, `eval.py`, `publish.py`), each with
`add_arguments(parser)` and `run(args)`; a command's module is imported only when it runs or its
parser is built, so `--help` stays fast. Arguments are read and checked by `cli/preflight.py` and `checkpoint/destinations.py` before the model loads; every
GrapeError becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from importlib import metadata
import sys

from ..checkpoint.load import DEFAULT_MODEL, default_model_path, heldout_paths  # noqa: F401 (public here since 0.1)
from ..errors import GrapeError

# name -> help: the one list both `optimum-grape` and `optimum-cli grape` build from.
HELP = {
    "prune": "calibrate, plan, merge and save a pruned model",
    "inspect": "show the MoE layout of a pruned checkpoint",
    "methods": "list the registered pruning methods",
    "eval": "zero-shot accuracy with lm-evaluation-harness on local task data; written into the model card",
    "publish": "prune, evaluate and upload variants (methods x ratios), refusing those over a perplexity ratio",
}


def command_module(name: str):
    """The module of command `name` (`optimum_grape.cli.<name>`), with `add_arguments` and `run`."""
    return importlib.import_module(f"{__name__}.{name}")


def _entry(name: str):
    return (HELP[name], lambda parser: command_module(name).add_arguments(parser),
            lambda args: command_module(name).run(args))


# name -> (help, add_arguments, run), as optimum/commands/register/grape.py reads it.
COMMANDS = {name: _entry(name) for name in HELP}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-grape",
        description="Remove redundant experts from a Mixture-of-Experts model (GRAPE, C-Prune and baselines) "
                    "and save a checkpoint that loads with transformers.")
    parser.add_argument("--version", action="version", version=f"optimum-grape {metadata.version('optimum-grape')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


# Loggers of libraries transformers imports whenever it loads a model (its quantization backends): their
# warnings (a CUDA kernel not found on a CPU machine, a torch.compile deprecation) say nothing about
# pruning, and a command's output should be what the command measured.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
# The shell's status for a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT = 130


def run_command(run, args, prog: str = "optimum-grape") -> int:
    """Run one command; a GrapeError becomes a one-line message and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return run(args)
    except GrapeError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Writes are staged beside the output and moved in whole, so an interrupt leaves nothing half-written.
        print(f"{prog}: interrupted; a checkpoint being written was discarded, nothing half-written is left.",
              file=sys.stderr)
        return INTERRUPTED_EXIT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
