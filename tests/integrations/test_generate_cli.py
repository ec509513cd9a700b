"""`sparsek generate` on a tiny local model: the untrained scorer keeps the first tokens by default."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sparsek.cli import main  # noqa: E402
from sparsek.ops.select import prefix_selection  # noqa: E402

from ..conftest import tiny_transformers_model  # noqa: E402


def test_generate_converts_with_the_first_tokens_kept(tmp_path, capsys):
    folder = tiny_transformers_model(tmp_path)
    main(["generate", "--model", str(folder), "--prompt", "abcdefghij", "--topk", "2", "--window", "2",
          "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "original, full attention" in out and "slope -1: keeps the first tokens" in out
    main(["generate", "--model", str(folder), "--prompt", "abcdefghij", "--topk", "2", "--window", "2",
          "--max-new-tokens", "2", "--device", "cpu", "--slope", "1"])
    assert "slope 1: keeps the newest tokens" in capsys.readouterr().out


def test_a_negative_slope_selects_the_first_keys():
    """u = -position: every query past the window selects keys 0 .. topk - 1 (the sinks), with mask 1."""
    t_len, topk, window = 12, 3, 2
    scores = -torch.arange(t_len, dtype=torch.float64).view(1, t_len, 1)
    selection = prefix_selection(scores, topk, window)
    for i in range(t_len):
        chosen = [j for j in range(t_len) if selection.start[0, j, 0] <= i < selection.end[0, j, 0]]
        assert chosen == list(range(min(topk, max(0, i - window + 1))))
