"""Discovery (coverage/discover.py) reads the MoE modeling files of the INSTALLED transformers."""

from optimum_grape.coverage.discover import fused_modules, other_moe_modules


FUSED = fused_modules()


def test_discovery_reads_the_installed_transformers():
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "qwen3_vl_moe", "glm4v_moe", "jamba"} <= set(FUSED)
    assert len(FUSED) >= 12 and not set(FUSED) & set(other_moe_modules())
