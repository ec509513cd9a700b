"""`TransformersLM`: a transformers model seen through the interface `evaluate` takes."""

from __future__ import annotations

import pytest
import torch

from ..conftest import tiny_transformers_model


def test_token_losses_in_slices_equal_the_whole(tmp_path, monkeypatch):
    """The loss taken a slice of positions at a time (to bound float32 memory) is that of all logits at once."""
    transformers = pytest.importorskip("transformers")
    from sparsek.heldout import TransformersLM

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_transformers_model(tmp_path)).eval()
    tokens = torch.randint(0, 256, (3, 41))
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits                                     # [3, 40, 256]
        want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        monkeypatch.setattr(TransformersLM, "LOSS_CHUNK", 3 * 256 * 7)          # 7 positions a slice, the last 5
        got = TransformersLM(model).token_losses(tokens)
    assert got.shape == (3, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
