"""The attention benchmark's NSA peer row: when it runs, why it is skipped, and its table columns (CPU)."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("triton")

from sparsek.bench import attention  # noqa: E402


def test_nsa_needs_a_power_of_two_group_of_at_least_16():
    for heads in ((16, 16), (32, 8), (48, 2)):           # groups 1, 4 and 24
        assert "power of 2 of at least 16" in attention.nsa_unavailable(*heads, topk=1024)


def test_nsa_needs_whole_blocks_of_keys():
    assert "multiple of 64" in attention.nsa_unavailable(64, 4, topk=1000)
    assert "multiple of 64" in attention.nsa_unavailable(64, 4, topk=32)


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="fla is installed here")
def test_nsa_without_fla_says_how_to_install_it():
    assert "pip install fla-core" in attention.nsa_unavailable(64, 4, topk=1024)


def test_default_heads_include_the_nsa_shape():
    args = attention.parse_args([])
    assert (64, 4) in args.heads
    reasons = [attention.nsa_unavailable(*heads, topk=args.topk) for heads in args.heads]
    assert any(r is None or r.startswith("fla is not importable") for r in reasons)   # only fla can stop it


def test_table_shows_the_nsa_columns(capsys):
    row = dict(T=8192, heads="64/4", batch=1, head_dim=128, topk=1024, window=512, gate="kv",
               sparsek_fwd_ms=1.0, sdpa_fwd_ms=2.0, flex_fwd_ms=None, sparsek_fwdbwd_ms=4.0, sdpa_fwdbwd_ms=8.0,
               flex_fwdbwd_ms=None, nsa_fwdbwd_ms=14.6, speedup_sdpa_fwdbwd=2.0, speedup_flex_fwdbwd=None,
               speedup_nsa_fwdbwd=3.65, sparsek_fwd_tflops=100.0, selection_share=0.1, sparsek_peak_mb=10.0,
               sdpa_peak_mb=20.0, sdpa_fwd_backend="cudnn", sdpa_fwdbwd_backend="cudnn")
    attention.print_table([row], dict(gpu="test", torch="-", triton="-"))
    header, line = capsys.readouterr().out.rstrip().splitlines()[-2:]

    def cell(name: str, width: int) -> str:          # columns are right-aligned to their header's end
        end = header.index(name) + len(name)
        return line[end - width:end].strip()

    assert cell("nsa f+b", 8) == "14.600"
    assert cell("x nsa", 6) == "3.65"
    assert cell("x sdpa", 6) == "2.00"
