"""safetensors files that are missing, truncated or not safetensors are refused by path (safetensors' own errors,
"Error while deserializing header: ...", do not say which file)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402

from sparsek.weights import (  # noqa: E402
    UnreadableWeightsError,
    check_safetensors_folder,
    load_safetensors,
    safetensors_metadata,
)

from .conftest import DAMAGES, damage_file  # noqa: E402


def saved(folder, name: str = "model.safetensors"):
    path = folder / name
    save_file({"w": torch.arange(64.0)}, path, {"step": "3"})
    return path


def test_good_file_reads_back(tmp_path):
    path = saved(tmp_path)
    assert safetensors_metadata(path) == {"step": "3"}
    assert torch.equal(load_safetensors(path)["w"], torch.arange(64.0))
    check_safetensors_folder(tmp_path)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_file_is_named(tmp_path, how):
    path = saved(tmp_path)
    damage_file(path, how)
    for read in (safetensors_metadata, load_safetensors):
        with pytest.raises(UnreadableWeightsError, match=f"^{re.escape(str(path))} is missing or not a readable"):
            read(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):  # a ValueError: the CLI reports it in one line
        check_safetensors_folder(tmp_path)


def test_folder_check_names_the_damaged_shard(tmp_path):
    saved(tmp_path, "model-00001-of-00002.safetensors")
    shard = saved(tmp_path, "model-00002-of-00002.safetensors")
    damage_file(shard, "truncated")
    with pytest.raises(UnreadableWeightsError, match=re.escape(str(shard))):
        check_safetensors_folder(tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UnreadableWeightsError, match=re.escape(str(tmp_path / "none.safetensors"))):
        load_safetensors(tmp_path / "none.safetensors")
