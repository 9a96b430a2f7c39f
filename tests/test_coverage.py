"""The family coverage matrix (optimum_grape.coverage) over the INSTALLED transformers: every model
type whose modeling file has fused experts, plus the other MoE modeling files, built tiny from its
own config class. Each either prunes (keep-all is bit-exact, 25% prune gives the planned counts and
leaves every other tensor equal, reload in one shared fresh process gives equal logits) or is refused
before calibration with a reason; at least 90% of the fused ones prune. The README's family table is
this matrix's rendering."""

from pathlib import Path

import pytest
import transformers

from optimum_grape.coverage.discover import fused_modules, other_moe_modules
from optimum_grape.coverage.matrix import run_matrix
from optimum_grape.coverage.report import readme_table, render_markdown, summary

FUSED = fused_modules()
MODULES = FUSED + other_moe_modules()
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return run_matrix(MODULES, tmp_path_factory.mktemp("matrix"))


@pytest.fixture(scope="module")
def by_module(matrix):
    return {result.module: result for result in matrix}


def test_discovery_reads_the_installed_transformers():
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "qwen3_vl_moe", "glm4v_moe", "jamba"} <= set(FUSED)
    assert len(FUSED) >= 12 and not set(FUSED) & set(other_moe_modules())


@pytest.mark.parametrize("module", MODULES)
def test_family_prunes_and_reloads_exactly_or_is_refused_with_a_reason(module, by_module):
    result = by_module[module]
    assert result.status in ("supported", "refused"), f"{module}: {result.reason}"
    if result.status == "refused":
        assert "docs/adding_a_family.md" in result.reason or "not a model optimum-grape prunes" in result.reason
        return
    assert result.checks == {"identity": True, "counts": True, "untouched": True, "reload": True}
    before, after = sum(result.experts_before.values()), sum(result.experts_after.values())
    assert before - after == round(0.25 * before)
    assert result.routing and result.routing != "not verified"


def test_at_least_90_percent_of_fused_families_prune(matrix):
    counts = summary(matrix, FUSED)
    assert counts["failed"] == 0 and counts["supported_share"] >= 0.9, counts


def test_readme_family_table_is_generated_from_the_matrix(matrix):
    table = readme_table(README)
    assert table is not None, "README.md lost its <!-- families:begin --> section"
    if f"transformers {transformers.__version__}:" not in table:
        pytest.skip(f"README table generated on another transformers version than {transformers.__version__}")
    assert table == render_markdown(matrix, FUSED), \
        "README family table is stale: python -m optimum_grape.coverage --readme README.md"
