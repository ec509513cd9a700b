"""The decode benchmark's CPU smoke path runs every row kind it can there (the GPU rows need CUDA)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from sparsek.bench import decode  # noqa: E402


def test_cpu_smoke_run_writes_every_row(tmp_path):
    result = decode.main(["--device", "cpu", "--tiny", "--topk", "4", "--window", "2", "--contexts", "24",
                          "--sparsek-contexts", "48", "--batches", "1,2", "--real-batches", "1", "--steps", "2",
                          "--generate", "16", "--out", str(tmp_path / "decode")])
    rows = {(r["batch"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(1, 24), (1, 48), (2, 24), (2, 48)}
    assert "full_eager_ms" in rows[1, 24] and "full_eager_ms" not in rows[1, 48]     # SparseK alone at 48
    assert "sparsek_real_eager_ms" in rows[1, 48] and "sparsek_real_eager_ms" not in rows[2, 48]
    for row in rows.values():
        assert all(math.isfinite(v) and v > 0 for k, v in row.items() if k.endswith("_ms"))
    # After real prefills of 24 and 48 tokens the SparseK cache holds the same bytes.
    assert rows[1, 24]["sparsek_real_cache_gb"] == rows[1, 48]["sparsek_real_cache_gb"] > 0
    assert json.loads((tmp_path / "decode.json").read_text())["generate"][0]["context"] == 16


def test_decode_step_bench_says_it_needs_a_gpu(monkeypatch):
    from sparsek.bench import decode_step

    monkeypatch.setattr(decode_step.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        decode_step.main([])


def test_unknown_way_is_refused(capsys):
    with pytest.raises(SystemExit) as error:
        decode.main(["--device", "cpu", "--tiny", "--ways", "graph,fast"])
    assert error.value.code == 2 and "--ways" in capsys.readouterr().err
