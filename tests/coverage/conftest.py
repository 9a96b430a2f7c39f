"""The family matrix over the installed transformers, run once for the tests of optimum_grape/coverage
that read it (test_matrix.py, test_report.py, test_main.py)."""

import pytest

from optimum_grape.coverage.discover import fused_modules, other_moe_modules
from optimum_grape.coverage.matrix import run_matrix

FUSED = fused_modules()
MODULES = FUSED + other_moe_modules()


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    return run_matrix(MODULES, tmp_path_factory.mktemp("matrix"))


@pytest.fixture(scope="session")
def by_module(matrix):
    return {result.module: result for result in matrix}

