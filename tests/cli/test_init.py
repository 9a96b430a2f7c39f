"""The `optimum-grape` command (cli/__init__.py): `--help` lists the commands, `prune --help` explains
its options."""

from helpers import run_cli


def test_help_explains_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("prune", "inspect", "methods"):
        assert word in result.stdout
    prune_help = run_cli("prune", "--help").stdout
    assert "--ratio" in prune_help and "--allocation" in prune_help and "default" in prune_help
