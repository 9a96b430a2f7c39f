"""`optimum-cli grape ...`: the commands registered in optimum's plugin namespace
(optimum/commands/register/grape.py)."""

import subprocess
import sys

import pytest


def test_optimum_cli_grape_subcommands():
    """`optimum-cli grape ...` through optimum's plugin namespace (optimum/commands/register/grape.py)."""
    import importlib.util

    spec = importlib.util.find_spec("optimum.commands.register.grape")
    if spec is not None:  # installed (pip install -e .): the real optimum-cli finds it
        result = subprocess.run([sys.executable, "-c", "import sys; from optimum.commands.optimum_cli import main; "
                                 "sys.argv = ['optimum-cli', 'grape', '--help']; main()"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        help_text = result.stdout
    else:  # running from a source tree that is not installed: load the register module by path
        import io
        from contextlib import redirect_stdout
        from pathlib import Path

        from optimum.commands.optimum_cli import RootOptimumCLICommand, register_optimum_cli_subcommand

        path = Path(__file__).resolve().parents[2] / "optimum" / "commands" / "register" / "grape.py"
        spec = importlib.util.spec_from_file_location("grape_register", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
        for command in module.REGISTER_COMMANDS:
            register_optimum_cli_subcommand(command, parent_command=root)
        buffer = io.StringIO()
        with redirect_stdout(buffer), pytest.raises(SystemExit):
            root.parser.parse_args(["grape", "--help"])
        help_text = buffer.getvalue()
    for word in ("prune", "inspect", "methods", "eval", "publish"):
        assert word in help_text


def test_optimum_cli_builds_its_parser_without_torch():
    """optimum imports every plugin module and builds every command's parser at each start: ours must stay
    light (no torch, no transformers quantizers) so that `optimum-cli --help` does not pay for it."""
    code = ("import sys; from optimum.commands.optimum_cli import RootOptimumCLICommand, "
            "register_optimum_cli_subcommand\n"
            "import optimum.commands.register.grape as grape\n"
            "root = RootOptimumCLICommand('optimum-cli')\n"
            "[register_optimum_cli_subcommand(c, parent_command=root) for c in grape.REGISTER_COMMANDS]\n"
            "heavy = [m for m in ('torch', 'transformers.modeling_utils', 'transformers.quantizers') if m in sys.modules]\n"
            "print('heavy', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "heavy []" in result.stdout
