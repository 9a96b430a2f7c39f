"""The README's benchmark tables are generated from the committed results files (benchmarks/report.py)
and must not drift from them: a stale table would be a claim nobody measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402

TESTBEDS = sorted(p.parent.name for p in (ROOT / "benchmarks" / "results").glob("*/quality.json"))


def test_every_testbed_with_results_has_a_readme_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert TESTBEDS, "no benchmarks/results/<testbed>/quality.json committed"
    for testbed in TESTBEDS:
        assert f"<!-- quality:{testbed}:begin -->" in readme, f"README.md has no table for testbed {testbed!r}"


@pytest.mark.parametrize("testbed", TESTBEDS)
def test_readme_table_equals_the_report_of_the_results_file(testbed):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = report.readme_section(testbed).search(readme)
    assert found, f"README.md lost the markers of testbed {testbed!r}"
    assert found.group(2) == report.testbed_report(testbed), (
        "README table is stale: run `python benchmarks/report.py --readme README.md`")


def test_quality_refuses_an_unknown_variant_before_loading_a_model():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--variants", "merge=average"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--variants ['merge=average']: choose from" in result.stderr and "'merge=drop'" in result.stderr
