"""The family coverage matrix (coverage/matrix.py) over the INSTALLED transformers: every model type
whose modeling file has fused experts, plus the other MoE modeling files, built tiny from its own
config class. Each either prunes (keep-all is bit-exact, 25% prune gives the planned counts and
leaves every other tensor equal, reload in one shared fresh process gives equal logits) or is refused
before calibration with a reason; at least 90% of the fused ones prune. The matrix itself is run once
(tests/coverage/conftest.py)."""

from pathlib import Path

import pytest
import transformers

from optimum_grape.coverage.discover import fused_modules, other_moe_modules
from optimum_grape.coverage.report import readme_table, summary


FUSED = fused_modules()


MODULES = FUSED + other_moe_modules()


FAMILIES_DOC = Path(__file__).resolve().parents[2] / "docs" / "families.md"


@pytest.mark.parametrize("module", MODULES)
def test_family_prunes_and_reloads_exactly_or_is_refused_with_a_reason(module, by_module):
    result = by_module[module]
    if result.status == "unbuilt" and not _readme_generated_on_this_version():
        # A transformers release newer than the table can bring a family whose defaults the
        # tiny fixture cannot shrink yet; it still counts against the 90% below.
        pytest.skip(f"{module}: {result.reason}")
    assert result.status in ("supported", "refused"), f"{module}: {result.reason}"
    if result.status == "refused":
        assert "docs/adding_a_family.md" in result.reason or "not a model optimum-grape prunes" in result.reason
        return
    assert result.checks == {"identity": True, "counts": True, "untouched": True, "reload": True}
    before, after = sum(result.experts_before.values()), sum(result.experts_after.values())
    assert before - after == round(0.25 * before)
    assert result.routing and result.routing != "not verified"


# Non-uniform layouts these families load without optimum-grape through the written modeling file.
REMOTE_CODE_EXACT = ("mixtral", "qwen2_moe", "qwen3_vl_moe", "deepseek_v3", "gpt_oss", "laguna")


@pytest.mark.parametrize("module", REMOTE_CODE_EXACT)
def test_written_remote_code_reloads_exactly_without_optimum_grape(module, by_module):
    assert by_module[module].remote_code == "exact", by_module[module].remote_code


def test_remote_code_is_exact_wherever_it_was_written(matrix):
    # A checkpoint either carries code that reproduces the pruned logits, or none and says why.
    wrong = {r.module: r.remote_code for r in matrix if r.remote_code.startswith("failed")}
    assert not wrong, wrong


def test_at_least_90_percent_of_fused_families_prune(matrix):
    counts = summary(matrix, FUSED)
    assert counts["failed"] == 0 and counts["supported_share"] >= 0.9, counts


def _readme_generated_on_this_version() -> bool:
    return f"transformers {transformers.__version__}:" in (readme_table(FAMILIES_DOC) or "")


def test_a_family_the_fixture_cannot_build_is_reported_as_unbuilt(tmp_path, monkeypatch):
    from optimum_grape.coverage import matrix as matrix_module

    def broken(*args, **kwargs):
        raise ValueError("`index_layers` must be increasing indexed-attention layers, got [4, 14].")

    monkeypatch.setattr(matrix_module, "build_tiny", broken)
    result, logits = matrix_module.prune_family("mixtral", tmp_path / "mixtral")
    assert logits is None and result.status == "unbuilt"
    assert "index_layers" in result.reason and "coverage/tiny.py needs an override" in result.reason
    assert summary([result], ["mixtral"])["supported_share"] == 0.0
