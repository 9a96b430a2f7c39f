"""The matrix as the family table of docs/families.md (coverage/report.py): the table there is this
matrix's rendering."""

from pathlib import Path

import pytest
import transformers

from optimum_grape.coverage.discover import fused_modules
from optimum_grape.coverage.report import readme_table, render_markdown


FUSED = fused_modules()


FAMILIES_DOC = Path(__file__).resolve().parents[2] / "docs" / "families.md"


def _readme_generated_on_this_version() -> bool:
    return f"transformers {transformers.__version__}:" in (readme_table(FAMILIES_DOC) or "")


def test_readme_family_table_is_generated_from_the_matrix(matrix):
    table = readme_table(FAMILIES_DOC)
    assert table is not None, "docs/families.md lost its <!-- families:begin --> section"
    if not _readme_generated_on_this_version():
        pytest.skip(f"family table generated on another transformers version than {transformers.__version__}")
    assert table == render_markdown(matrix, FUSED), \
        "family table is stale: python -m optimum_grape.coverage --doc docs/families.md"
