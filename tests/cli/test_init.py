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


def test_every_option_has_help_that_shows_its_default():
    import argparse

    from optimum_grape.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    problems = []
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                problems.append(f"{name} {action.option_strings or action.dest}: no help")
            elif action.default not in (None, False) and "default" not in action.help:
                problems.append(f"{name} {action.option_strings}: default {action.default!r} not shown")
    assert problems == []


def test_version():
    from optimum_grape import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"optimum-grape {__version__}"


def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(tmp_path):
    # issue 25: an interrupt printed a KeyboardInterrupt traceback. A SIGINT lands while the command
    # runs; the output folder must not exist afterwards, and stderr holds one line, no traceback.
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "optimum_grape", "prune", "default", "--output", str(out)],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    for line in process.stderr:  # wait until the job is under way: calibration comes next
        seen.append(line)
        if line.startswith("Calibration data:"):
            break
    process.send_signal(signal.SIGINT)
    stderr = "".join(seen) + process.communicate(timeout=120)[1]
    lines = [line for line in stderr.splitlines() if "interrupted" in line or "Traceback" in line]
    assert process.returncode == 130, stderr[-2000:]
    assert lines == ["optimum-grape: interrupted; a checkpoint being written was discarded, nothing half-written "
                     "is left."]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
