"""The matrix as the README's family table (coverage/report.py): the table in README.md is this
matrix's rendering."""

from pathlib import Path

import pytest
import transformers

from optimum_grape.coverage.discover import fused_modules
from optimum_grape.coverage.report import readme_table, render_markdown


FUSED = fused_modules()


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_generated_on_this_version() -> bool:
    return f"transformers {transformers.__version__}:" in (readme_table(README) or "")


def test_readme_family_table_is_generated_from_the_matrix(matrix):
    table = readme_table(README)
    assert table is not None, "README.md lost its <!-- families:begin --> section"
    if not _readme_generated_on_this_version():
        pytest.skip(f"README table generated on another transformers version than {transformers.__version__}")
    assert table == render_markdown(matrix, FUSED), \
        "README family table is stale: python -m optimum_grape.coverage --readme README.md"
