"""The benchmark tables of docs/benchmarks.md and the README's summary are generated from the committed
results files (benchmarks/report.py) and must not drift from them: a stale table would be a claim
nobody measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402

TESTBEDS = sorted(p.parent.name for p in (ROOT / "benchmarks" / "results").glob("*/quality.json"))
STALE = "stale: run `python benchmarks/report.py --write`"


def test_every_testbed_with_results_has_a_table():
    doc = report.DOC.read_text(encoding="utf-8")
    assert TESTBEDS, "no benchmarks/results/<testbed>/quality.json committed"
    for testbed in TESTBEDS:
        assert f"<!-- quality:{testbed}:begin -->" in doc, f"{report.DOC} has no table for testbed {testbed!r}"


@pytest.mark.parametrize("testbed", TESTBEDS)
def test_table_equals_the_report_of_the_results_file(testbed):
    found = report.section(testbed).search(report.DOC.read_text(encoding="utf-8"))
    assert found, f"{report.DOC} lost the markers of testbed {testbed!r}"
    assert found.group(2) == report.testbed_report(testbed), f"table of {testbed!r} is {STALE}"


def test_readme_summary_equals_the_results_files():
    found = report.section(report.SUMMARY).search(report.README.read_text(encoding="utf-8"))
    assert found, "README.md lost its <!-- quality:summary:begin --> block"
    assert found.group(2) == report.summary_table(report.testbed_order()), f"README summary is {STALE}"


def test_readme_fits_on_a_page():
    assert len(report.README.read_text(encoding="utf-8").splitlines()) <= 300


def test_quality_refuses_an_unknown_variant_before_loading_a_model():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--variants", "merge=average"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--variants ['merge=average']: choose from" in result.stderr and "'merge=drop'" in result.stderr


def test_scale_table_and_readme_lines_equal_the_results_files():
    found = report.section(report.SCALE).search(report.SCALE_DOC.read_text(encoding="utf-8"))
    assert found, f"{report.SCALE_DOC} lost its <!-- quality:scale:begin --> block"
    assert found.group(2) == report.scale_table(), f"docs/scale.md's table is {STALE}"
    found = report.section(report.SCALE_SUMMARY).search(report.README.read_text(encoding="utf-8"))
    assert found, "README.md lost its <!-- quality:scale-summary:begin --> block"
    assert found.group(2) == report.scale_summary(), f"README's memory and time lines are {STALE}"
