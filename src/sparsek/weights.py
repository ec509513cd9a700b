"""safetensors files, read so that a missing, truncated or foreign file is an error naming its path.

safetensors' own errors ("Error while deserializing header: incomplete metadata, file not fully covered") do not
say which file, nor does transformers' from_pretrained, which passes them on; a model folder may hold several
(shards). Every place that reads weights (run checkpoints, saved SparseK models, model folders) goes through here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = ["UnreadableWeightsError", "check_safetensors_folder", "load_safetensors", "safetensors_metadata"]


class UnreadableWeightsError(ValueError):
    """A safetensors file that is missing, truncated or not safetensors at all; the message starts with its path."""


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, from its header only. safetensors checks the header against the file's
    size, so a truncated file fails here too."""
    try:
        with safe_open(path, "pt") as file:
            return file.metadata() or {}
    except (OSError, SafetensorError) as error:
        raise UnreadableWeightsError(f"{path} is missing or not a readable safetensors file ({error})") from error


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by name, on the CPU."""
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise UnreadableWeightsError(f"{path} is missing or not a readable safetensors file ({error})") from error


def check_safetensors_folder(folder: str | Path) -> None:
    """Refuse, by path, the first unreadable *.safetensors file of a model folder (before transformers reads it)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        safetensors_metadata(path)
