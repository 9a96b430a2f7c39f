"""`optimum-grape methods`: the registered pruning methods, one line each."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`methods` takes no arguments."""


def run(args) -> int:
    from ..methods import METHODS

    for name, method in sorted(METHODS.items()):
        print(f"{name:13s} allocations={list(method.allocations)} default={method.default_allocation} "
              f"merge={method.default_merge} needs={sorted(method.needs) or ['routing']}  [{method.reference}]")
    return 0
