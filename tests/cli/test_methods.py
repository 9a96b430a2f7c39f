"""`optimum-grape methods` (cli/methods.py) lists the registered methods."""

from helpers import run_cli


def test_methods_lists_grape():
    result = run_cli("methods")
    assert result.returncode == 0 and "grape" in result.stdout
