"""`import optimum_grape` (optimum_grape/__init__.py): quiet and light, public names on first use, and
the 'grape' layout registered with transformers whichever is imported first."""

import subprocess
import sys

import pytest


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_prints_nothing_and_loads_no_quantization_backend():
    result = run("import sys, optimum_grape\n"
                 "print(sorted(m for m in ('torch', 'torchao', 'transformers.quantizers') if m in sys.modules))")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("first", ["optimum_grape", "transformers.modeling_utils"])
def test_grape_is_registered_whichever_is_imported_first(first):
    second = "transformers.modeling_utils" if first == "optimum_grape" else "optimum_grape"
    result = run(f"import importlib; importlib.import_module({first!r}); importlib.import_module({second!r})\n"
                 "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING\n"
                 "import transformers.modeling_utils as mu\n"
                 "from optimum_grape import GrapeConfig, GrapeHfQuantizer\n"
                 "print(AUTO_QUANTIZATION_CONFIG_MAPPING['grape'] is GrapeConfig, "
                 "AUTO_QUANTIZER_MAPPING['grape'] is GrapeHfQuantizer, "
                 "getattr(mu.get_hf_quantizer, '__optimum_grape_carrier__', False))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True", "True"]


def test_public_names_load_on_first_use():
    import optimum_grape

    for name in optimum_grape.__all__:
        assert getattr(optimum_grape, name) is not None
    assert set(optimum_grape.__all__) <= set(dir(optimum_grape))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        optimum_grape.Nope
