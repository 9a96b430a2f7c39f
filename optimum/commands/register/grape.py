"""`optimum-cli grape prune|inspect|methods|eval|publish`: optimum-grape's commands under optimum's CLI.

optimum-cli imports every module of the `optimum.commands.register` namespace package (PEP 420:
no `__init__.py` anywhere on this path) and registers the commands in its `REGISTER_COMMANDS`.
Each subcommand takes the same arguments and runs the same function as `optimum-grape <command>`
(`optimum_grape.cli.COMMANDS`); heavy imports happen only when a command runs.
"""

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum_grape.cli import COMMANDS, run_command


def _leaf(name: str, add_arguments, run):
    class GrapeSubcommand(BaseOptimumCLICommand):
        @staticmethod
        def parse_args(parser):
            add_arguments(parser)

        def run(self):
            status = run_command(run, self.args, prog=f"optimum-cli grape {name}")
            if status:
                sys.exit(status)

    GrapeSubcommand.__name__ = f"Grape{name.capitalize()}Command"
    return CommandInfo(name=name, help=COMMANDS[name][0], subcommand_class=GrapeSubcommand)


class GrapeCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="grape", help="Prune and merge the experts of Mixture-of-Experts models (optimum-grape).")
    SUBCOMMANDS = tuple(_leaf(name, add, run) for name, (_, add, run) in COMMANDS.items())


REGISTER_COMMANDS = [GrapeCommand]
