"""Where the tensors of a checkpoint live (layerwise/checkpoint_index.py): a checkpoint without
safetensors files is refused."""

import pytest

from optimum_grape.errors import UnsupportedModelError
from optimum_grape.layerwise import LayerwiseModel


def test_a_checkpoint_without_safetensors_is_refused(tmp_path, base_folder):
    import shutil

    shutil.copytree(base_folder, tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        LayerwiseModel(tmp_path / "bin")
