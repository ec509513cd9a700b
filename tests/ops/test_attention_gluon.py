"""The draft Gluon forward (ops/attention/gluon.py): it compiles for sm_90 where the installed Triton has the
Gluon API it is written for (3.6's), and on an H100/H200 it equals the `tl` forward on the same selection.

The compile check runs in a subprocess, as in test_kernels_compile.py: conftest's interpreter setting changes
what the jit decorators return. CI's Triton (3.9) renamed the copy the kernel uses, so there it skips and says
so; the GPU machine has Triton 3.6.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    try:
        from triton.experimental.gluon._runtime import GluonASTSource
        from sparsek.ops.attention import gluon
        from sparsek.ops.common import tiles
    except ImportError as err:                  # a Triton without Gluon, or without this API
        print("SKIP", err)
        raise SystemExit(0)
    if not gluon.gluon_api_supported():
        print("SKIP the Gluon forward is written for Triton 3.6; this is", triton.__version__)
        raise SystemExit(0)
    fn = gluon.sparsek_fwd_gluon_kernel
    # (dtype, head dim, gate, (keys per tile, stages, rows per program, producer warps)): the default configs
    # (None), then tuning ones.
    for dtype, head_dim, gate, config in (
            ("bf16", 128, 0, None), ("bf16", 64, 1, None), ("fp16", 128, 2, None), ("bf16", 256, 0, None),
            ("bf16", 128, 0, (32, 3, 64, 0)), ("bf16", 64, 1, (128, 2, 128, 0)), ("bf16", 128, 0, (64, 3, 128, 0)),
            ("fp16", 64, 2, (32, 3, 64, 4))):
        if config is None:
            default = tiles.gluon_forward(tiles.SM90, head_dim)
            config = (default["keys_per_tile"], default["stages"], default["rows"] or 128, default["producer_warps"])
        keys, stages, rows, producer = config
        x = "*" + dtype
        pointers = dict(Q=x, K=x, V=x, U="*fp32", TAU="*fp32", START="*i32", END="*i32", LISTS="*i32", OUT=x,
                        LSE="*fp32", POISON="*fp32")
        constexprs = dict(GATE=gate, LIST_BLOCK=128, BLOCK_M=rows, BLOCK_N=keys, HEAD_DIM=head_dim, STAGES=stages,
                          NUM_WARPS=rows // 16, PRODUCER_WARPS=producer)
        signature = {name: "constexpr" if name in constexprs else ("i32",) * 3 if name.endswith("_strides") else
                     pointers.get(name, "fp32" if name == "qk_scale2" else "i32") for name in fn.arg_names}
        # A real launch marks pointers and strides (multiples of D) divisible by 16; cp.async needs to know.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in pointers}
        attrs.update({(i, j): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                      if name.endswith("_strides") for j in range(3)})
        compiled = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=rows // 16))
        ptx = compiled.asm["ptx"]
        # Each release of a stage by the attending warps must follow a barrier of all of them.
        lines = [line for line in ptx.splitlines() if not line.strip().startswith((".loc", "//"))]
        releases = [i for i, line in enumerate(lines) if re.search(r"\\bmbarrier\\.arrive\\.shared", line)]
        fenced = sum(any(re.search(rf"bar\\.sync\\s+0,\\s*{32 * (rows // 16)};", line) for line in lines[i - 4:i])
                     for i in releases)
        print("compiled", dtype, head_dim, gate, producer, "wgmma", len(re.findall(r"wgmma\\.mma_async", ptx)),
              "cp.async", len(re.findall(r"cp\\.async\\.c[ag]", ptx)),
              "producer", len(re.findall(r"cp\\.async\\.mbarrier\\.arrive", ptx)),
              "releases", len(releases), "fenced", fenced)
    # The dq pass: the forward's default configs, and one without the producer. A launch specialises integer
    # arguments equal to 1 to constants (GROUP = 1: one query head per KV head); compile that too, as a constant
    # can take another lowering path.
    fn = gluon.sparsek_bwd_dq_gluon_kernel
    for dtype, head_dim, gate, config, group_one in (
            ("bf16", 128, 0, None, False), ("fp16", 64, 1, None, False), ("bf16", 256, 2, None, False),
            ("bf16", 128, 1, (64, 3, 128, 0), False), ("bf16", 128, 0, None, True), ("bf16", 256, 1, None, True)):
        if config is None:
            default = tiles.gluon_dq(tiles.SM90, head_dim)
            config = (default["keys_per_tile"], default["stages"], default["rows"] or 128, default["producer_warps"])
        keys, stages, rows, producer = config
        x = "*" + dtype
        pointers = dict(Q=x, K=x, V=x, U="*fp32", TAU="*fp32", START="*i32", END="*i32", LISTS="*i32", DO=x, OUT=x,
                        LSE="*fp32", DELTA="*fp32", DQ=x, DTAU="*fp32")
        constexprs = dict(GATE=gate, LIST_BLOCK=128, BLOCK_M=rows, BLOCK_N=keys, HEAD_DIM=head_dim, STAGES=stages,
                          NUM_WARPS=rows // 16, PRODUCER_WARPS=producer, **({"GROUP": 1} if group_one else {}))
        signature = {name: "constexpr" if name in constexprs else ("i32",) * 3 if name.endswith("_strides") else
                     pointers.get(name, "fp32" if name == "scale" else "i32") for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in pointers}
        attrs.update({(i, j): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                      if name.endswith("_strides") for j in range(3)})
        ptx = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=rows // 16)).asm["ptx"]
        print("compiled-dq", dtype, head_dim, gate, producer, "wgmma", len(re.findall(r"wgmma\\.mma_async", ptx)),
              "producer", len(re.findall(r"cp\\.async\\.mbarrier\\.arrive", ptx)))
    # The list pass (GROUP is never specialised: see the kernel), plain stores and atomic flushes.
    fn = gluon.sparsek_bwd_list_gluon_kernel
    for dtype, head_dim, gate, atomic in (("bf16", 128, 0, False), ("fp16", 64, 1, True), ("bf16", 128, 2, True)):
        config = tiles.gluon_list(tiles.SM90, head_dim)
        x = "*" + dtype
        pointers = dict(Q=x, K=x, V=x, U="*fp32", TAU="*fp32", END="*i32", LISTS="*i32", DO=x, LSE="*fp32",
                        DELTA="*fp32", DK="*fp32", DV="*fp32", DU="*fp32")
        constexprs = dict(GATE=gate, LIST_BLOCK=128, BLOCK_N=config["slots"], SUB_M=config["rows"],
                          HEAD_DIM=head_dim, STAGES=config["stages"], NUM_WARPS=config["slots"] // 16, ATOMIC=atomic)
        signature = {name: "constexpr" if name in constexprs else ("i32",) * 3 if name.endswith("_strides") else
                     pointers.get(name, "fp32" if name == "scale" else "i32") for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in pointers}
        attrs.update({(i, j): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                      if name.endswith("_strides") for j in range(3)})
        ptx = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=config["slots"] // 16)).asm["ptx"]
        print("compiled-list", dtype, head_dim, gate, atomic, "wgmma", len(re.findall(r"wgmma\\.mma_async", ptx)),
              "atomics", len(re.findall(r"\\b(red|atom)\\.global", ptx)))
''')


def test_gluon_forward_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("compiled ")]
    assert len(lines) == 8
    for line in lines:                          # both products are wgmma, and K, V arrive by cp.async
        assert int(line[line.index("wgmma") + 1]) > 0 and int(line[line.index("cp.async") + 1]) > 0
        # a producer partition signals each filled stage with a cp.async mbarrier arrive, and only then
        assert (int(line[line.index("producer") + 1]) > 0) == (line[4] == "4")
        releases = int(line[line.index("releases") + 1])
        assert releases == int(line[line.index("fenced") + 1]) and (releases > 0) == (line[4] == "4")
    list_lines = [line.split() for line in result.stdout.splitlines() if line.startswith("compiled-list")]
    assert len(list_lines) == 3
    for line in list_lines:                     # four products per step, all wgmma; atomics only when asked
        assert int(line[line.index("wgmma") + 1]) >= 4
        assert (int(line[line.index("atomics") + 1]) > 0) == (line[4] == "True")
    dq_lines = [line.split() for line in result.stdout.splitlines() if line.startswith("compiled-dq")]
    assert len(dq_lines) == 6
    for line in dq_lines:                       # three products per tile, all wgmma
        assert int(line[line.index("wgmma") + 1]) >= 3
        assert (int(line[line.index("producer") + 1]) > 0) == (line[4] == "4")


def _selected_inputs(batch, t_len, heads, head_dim, topk, window, dtype, seed):
    """Random q, k, v and scores on the GPU (heads = (query, KV)) and their selection as the forward makes it:
    (q, k, v, u, tau, start, end, lists, poison)."""
    from sparsek.ops.attention import fused
    from sparsek.ops.common import tiles

    torch.manual_seed(seed)
    n_q_heads, n_kv_heads = heads
    q = torch.randn(batch, t_len, n_q_heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, t_len, n_kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    u = fused.score_rows(torch.randn(batch, t_len, n_kv_heads, device="cuda"))
    block = tiles.forward(tiles.target(q.device), head_dim)["BLOCK_M"]
    return (q, k, v, u, *fused.forward_selection((u,), (topk, window, block)))


def _gluon_runs_here() -> bool:
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability() != (9, 0):
        return False
    try:
        from sparsek.ops.attention import gluon
    except ImportError:
        return False
    return gluon.gluon_api_supported()


@pytest.mark.skipif(not _gluon_runs_here(), reason="needs an sm_90 GPU and Triton 3.6's Gluon API")
@pytest.mark.parametrize("t_len, heads, head_dim, gate, topk, window, dtype", [
    (1000, (4, 4), 128, "kv", 256, 128, torch.bfloat16),
    (4096, (8, 2), 128, "v", 256, 128, torch.bfloat16),
    (2500, (4, 1), 64, "none", 256, 128, torch.bfloat16),
    (4096, (4, 4), 64, "kv", 200, 100, torch.float16),       # slots not a multiple of the 64-key tile
    (1500, (4, 2), 128, "kv", 256, 0, torch.bfloat16),       # no window: the lists and in-block candidates
    (300, (2, 2), 128, "v", 64, 4096, torch.bfloat16),       # the window covers every key
    (100, (4, 4), 64, "kv", 512, 32, torch.bfloat16),        # one partial block, topk > T
])
def test_gluon_forward_equals_the_tl_forward(t_len, heads, head_dim, gate, topk, window, dtype):
    from sparsek.ops.attention import fused, gluon

    args = (*_selected_inputs(2, t_len, heads, head_dim, topk, window, dtype, seed=0), window, gate, head_dim ** -0.5)
    o_tl, lse_tl = fused.fused_forward(*args)
    o_gl, lse_gl = gluon.fused_forward_gluon(*args)
    assert torch.isfinite(o_gl).all()
    torch.testing.assert_close(lse_gl, lse_tl, atol=2e-3, rtol=0)
    # Two fp32-accumulating kernels over the same 16-bit inputs differ in summation order only: about one
    # rounding step of o (|o| ~ 0.07 here); a wrong mask or gate moves o by far more (0.045 for "v" as "none").
    torch.testing.assert_close(o_gl.float(), o_tl.float(), atol=4e-3, rtol=1.6e-2)


@pytest.mark.skipif(not _gluon_runs_here(), reason="needs an sm_90 GPU and Triton 3.6's Gluon API")
@pytest.mark.parametrize("keys, stages, rows, producer", [
    (32, 3, 64, 0), (64, 2, None, 0), (128, 2, None, 0), (32, 4, 64, 0), (64, 4, 64, 0), (128, 2, 64, 0),
    (64, 3, None, 4), (64, 2, None, 4), (32, 3, 64, 4), (32, 4, None, 4),        # warp-specialised
])
@pytest.mark.parametrize("t_len, window, gate", [
    (2500, 128, "kv"),     # a partial last block of 68 queries: both of its 64-row programs run
    (2450, 128, "v"),      # 18 queries in the last block: its second 64-row program is not launched
    (50, 32, "none"),      # T < 64
    (700, 0, "kv"),        # no window
    (300, 4096, "kv"),     # the window covers every key
])
def test_gluon_tuning_configs_equal_the_tl_forward(keys, stages, rows, producer, t_len, window, gate):
    from sparsek.ops.attention import fused, gluon
    from sparsek.ops.common import tiles

    torch.manual_seed(1)
    q = torch.randn(1, t_len, 4, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, t_len, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    u = fused.score_rows(torch.randn(1, t_len, 2, device="cuda"))
    block = tiles.forward(tiles.target(q.device), 128)["BLOCK_M"]
    tau, start, end, lists, poison = fused.forward_selection((u,), (256, window, block))
    args = (q, k, v, u, tau, start, end, lists, poison, window, gate, 128 ** -0.5)
    o_tl, lse_tl = fused.fused_forward(*args)
    o_gl, lse_gl = gluon.fused_forward_gluon(*args, keys_per_tile=keys, stages=stages, rows=rows,
                                             producer_warps=producer)
    torch.testing.assert_close(lse_gl, lse_tl, atol=2e-3, rtol=0)
    torch.testing.assert_close(o_gl.float(), o_tl.float(), atol=4e-3, rtol=1.6e-2)


@pytest.mark.skipif(not _gluon_runs_here(), reason="needs an sm_90 GPU and Triton 3.6's Gluon API")
@pytest.mark.parametrize("t_len, heads, head_dim, gate, topk, window, dtype, config", [
    (1000, (4, 4), 128, "kv", 256, 128, torch.bfloat16, {}),
    (4096, (8, 2), 128, "v", 256, 128, torch.bfloat16, {}),
    (2500, (4, 1), 64, "none", 256, 128, torch.bfloat16, {}),
    (4096, (4, 4), 64, "kv", 200, 100, torch.float16, {}),     # slots not a multiple of the 64-key tile
    (1500, (4, 2), 128, "kv", 256, 0, torch.bfloat16, {}),     # no window
    (300, (2, 2), 128, "v", 64, 4096, torch.bfloat16, {}),     # the window covers every key
    (100, (4, 4), 64, "kv", 512, 32, torch.bfloat16, {}),      # one partial block, topk > T
    (2000, (4, 2), 256, "kv", 256, 128, torch.bfloat16, {}),   # head dim 256
    (2450, (4, 2), 128, "kv", 256, 128, torch.bfloat16, dict(producer_warps=0)),
    (2450, (4, 2), 128, "v", 256, 128, torch.bfloat16, dict(keys_per_tile=32, rows=64, producer_warps=4)),
    (2500, (4, 2), 128, "kv", 256, 128, torch.bfloat16, dict(rows=64, stages=2, producer_warps=0)),
    (50, (4, 2), 128, "kv", 256, 32, torch.bfloat16, dict(keys_per_tile=128, stages=2, producer_warps=0)),
])
def test_gluon_dq_pass_equals_the_tl_dq_pass(t_len, heads, head_dim, gate, topk, window, dtype, config):
    from sparsek.ops.attention import fused, gluon

    q, k, v, u, tau, start, end, lists, poison = _selected_inputs(2, t_len, heads, head_dim, topk, window, dtype,
                                                                  seed=3)
    scale = head_dim ** -0.5
    o, lse = fused.fused_forward(q, k, v, u, tau, start, end, lists, poison, window, gate, scale)
    do = torch.randn_like(q)
    args = (do, q, k, v, o, lse, u, tau, start, end, lists, min(window, t_len), gate, scale)
    dq_tl, dtau_tl, delta_tl = fused.dq_pass(*args)
    dq_gl, dtau_gl, delta_gl = gluon.dq_pass_gluon(*args, **config)
    assert torch.isfinite(dq_gl).all() and torch.isfinite(dtau_gl).all()
    torch.testing.assert_close(delta_gl, delta_tl, atol=1e-5, rtol=1e-5)   # the same fp32 sum, in another order
    # dS rounds to 16 bits before dS K in both kernels; a step of difference in fp32 dS can flip that rounding.
    # A wrong mask, gate or tile moves dq by a good fraction of its largest value.
    torch.testing.assert_close(dq_gl.float(), dq_tl.float(), atol=2 ** -7 * dq_tl.float().abs().max().item(),
                               rtol=1.6e-2)
    # dtau is 0 for gate "none" and wherever no selected key has a fractional mask (at most topk candidates,
    # or a window that covers every key); the first cases have plenty.
    torch.testing.assert_close(dtau_gl, dtau_tl, atol=1e-3 * dtau_tl.abs().max().item(), rtol=1e-2)
    if gate != "none" and t_len > 2 * (topk + window):
        assert dtau_tl.abs().max() > 0


@pytest.mark.skipif(not _gluon_runs_here(), reason="needs an sm_90 GPU and Triton 3.6's Gluon API")
@pytest.mark.parametrize("batch, t_len, heads, head_dim, gate, topk, window, config", [
    (2, 4096, (4, 4), 128, "kv", 256, 128, {}),          # 16 programs: blocks split, atomic adds
    (2, 4096, (8, 2), 128, "v", 256, 128, {}),
    (2, 2500, (4, 1), 64, "none", 256, 128, {}),
    (2, 4096, (8, 4), 128, "kv", 2048, 128, {}),         # 128 programs: one per slot tile, plain stores
    (1, 1500, (4, 2), 128, "kv", 200, 0, {}),            # no window; slots not a multiple of the tile
    (1, 100, (4, 4), 64, "kv", 512, 32, {}),             # one partial block, topk > T
    (2, 3000, (16, 1), 128, "kv", 256, 128, dict(slots=64, rows=64, stages=2)),
    (1, 3000, (4, 4), 128, "v", 256, 128, dict(rows=64, stages=2)),
])
def test_gluon_list_pass_equals_the_tl_list_pass(batch, t_len, heads, head_dim, gate, topk, window, config):
    from sparsek.ops.attention import fused, gluon

    q, k, v, u, tau, start, end, lists, poison = _selected_inputs(batch, t_len, heads, head_dim, topk, window,
                                                                  torch.bfloat16, seed=4)
    n_kv_heads = heads[1]
    scale = head_dim ** -0.5
    o, lse = fused.fused_forward(q, k, v, u, tau, start, end, lists, poison, window, gate, scale)
    do = torch.randn_like(q)
    window = min(window, t_len)
    _, _, delta = fused.dq_pass(do, q, k, v, o, lse, u, tau, start, end, lists, window, gate, scale)
    args = (do, q, k, v, lse, delta, u, tau, end, lists, topk, window, gate, scale)
    want = fused.list_pass(*args)
    got = gluon.list_pass_gluon(*args, **config)
    # Only the rows of listed keys are written (the others may hold anything).
    rows = batch * n_kv_heads
    listed = torch.zeros(rows, t_len + 1, dtype=torch.bool, device="cuda")
    flat = lists.reshape(rows, -1).long()
    listed.scatter_(1, torch.where(flat >= 0, flat, t_len), True)
    listed = listed[:, :t_len]
    assert listed.any()
    by_key = listed.view(batch, n_kv_heads, t_len).permute(0, 2, 1)          # [B, T, Hk], the rows of dk, dv
    for name, g, w in (("dk", got[0][by_key], want[0][by_key]), ("dv", got[1][by_key], want[1][by_key]),
                       ("du", got[2][listed], want[2][listed])):
        assert torch.isfinite(g).all(), name
        # The same float32 sums of products of 16-bit factors (P^T m and dS^T rounded to 16 bits in both), in
        # another order: a wrong mask, key or flush moves them by far more.
        torch.testing.assert_close(g, w, atol=2 ** -7 * w.abs().max().item() + 1e-6, rtol=1.6e-2, msg=name)


def _qkv_scores(t_len=40, heads=2, head_dim=16):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, t_len, heads, head_dim) for _ in range(3))
    return q, k, v, torch.randn(1, t_len, heads)


def test_backend_triton_and_auto_off_cuda_take_the_tl_forward(monkeypatch):
    from sparsek.ops.attention import fused

    q = _qkv_scores()[0]
    assert fused.choose_forward(q, "triton") == "tl"
    assert fused.choose_forward(q, "auto") == "tl"
    monkeypatch.setattr(fused, "GLUON_BY_DEFAULT", True)      # with Gluon on by default, still not off CUDA
    assert fused.choose_forward(q, "auto") == "tl"


def test_the_dq_pass_follows_the_forward_and_its_own_switch(monkeypatch):
    """The Gluon dq pass runs where the Gluon forward does (backend "gluon", or "auto" while GLUON_BY_DEFAULT
    is on), and only while GLUON_DQ is on. The CPU tensor stands in for one the Gluon kernels take."""
    from sparsek.ops.attention import fused, gluon

    q = _qkv_scores()[0]
    monkeypatch.setattr(gluon, "cannot_run", lambda *tensors: None)
    monkeypatch.setattr(fused, "GLUON_BY_DEFAULT", True)
    for switch, want in ((False, "tl"), (True, "gluon")):
        monkeypatch.setattr(fused, "GLUON_DQ", switch)
        assert fused.choose_dq(q, "auto") == want and fused.choose_dq(q, "gluon") == want
        assert fused.choose_dq(q, "triton") == "tl"
    monkeypatch.setattr(fused, "GLUON_BY_DEFAULT", False)          # no Gluon forward by default: no Gluon dq
    assert fused.choose_dq(q, "auto") == "tl"


def test_the_list_pass_stays_tl_until_switched_on(monkeypatch):
    """The Gluon list pass runs only while GLUON_LIST is on, where the Gluon forward runs, at head dims with a
    config (up to 128)."""
    from sparsek.ops.attention import fused, gluon

    q = _qkv_scores()[0]                                          # head dim 16
    monkeypatch.setattr(gluon, "cannot_run", lambda *tensors: None)
    monkeypatch.setattr(fused, "GLUON_BY_DEFAULT", True)
    assert fused.GLUON_LIST is False and fused.choose_list(q, "gluon") == "tl"
    monkeypatch.setattr(fused, "GLUON_LIST", True)
    assert fused.choose_list(q, "auto") == "gluon" and fused.choose_list(q, "triton") == "tl"
    assert fused.choose_list(torch.zeros(1, 4, 1, 256), "gluon") == "tl"     # no config at head dim 256

def test_backend_gluon_says_why_it_cannot_run():
    from sparsek import sparsek_attention
    from sparsek.ops.attention import fused

    q, k, v, scores = _qkv_scores()
    # Under the interpreter the fused path takes CPU tensors and the Gluon check refuses them; without the
    # interpreter the fused path itself refuses them.
    with pytest.raises(ValueError, match="backend='gluon' (cannot run here: it|needs CUDA tensors)"):
        sparsek_attention(q, k, v, scores, topk=4, window=4, backend="gluon")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused.sparsek_attention_fused(q, k, v, scores, topk=4, window=4, backend="tl")


def test_an_sm90_gpu_without_the_gluon_api_warns_once(monkeypatch):
    """"auto" falls back to the tl forward with one warning when only the Triton version stands in the way;
    the CPU tensor stands in for one on an sm_90 GPU (choose_forward asks only on_sm90 and cannot_run)."""
    from sparsek.ops.attention import fused, gluon

    q = _qkv_scores()[0]
    monkeypatch.setattr(fused, "GLUON_BY_DEFAULT", True)
    monkeypatch.setattr(fused, "on_sm90", lambda x: True)
    monkeypatch.setattr(gluon, "gluon_api_supported", lambda: False)
    monkeypatch.setattr(gluon, "cannot_run", lambda *tensors: "it is written for Triton 3.6's Gluon API")
    monkeypatch.setattr(fused, "_GLUON_VERSION_WARNED", False)
    with pytest.warns(UserWarning, match="Gluon forward is off") as caught:
        assert fused.choose_forward(q, "auto") == "tl"
        assert fused.choose_forward(q, "auto") == "tl"
    assert len(caught) == 1
    monkeypatch.setattr(fused, "on_sm90", lambda x: False)       # another GPU: no warning at all
    monkeypatch.setattr(fused, "_GLUON_VERSION_WARNED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.choose_forward(q, "auto") == "tl"


WS_SCRIPT = textwrap.dedent('''
    import torch
    from sparsek.ops.attention import fused, gluon
    from sparsek.ops.common import tiles

    torch.manual_seed(2)
    for t_len, hq, hk, keys, stages, rows in ((8192, 8, 2, 64, 3, None), (8192, 8, 2, 32, 3, 64),
                                              (3000, 4, 4, 64, 2, None), (5000, 16, 16, 32, 4, None)):
        q = torch.randn(1, t_len, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, t_len, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        u = fused.score_rows(torch.randn(1, t_len, hk, device="cuda"))
        block = tiles.forward(tiles.target(q.device), 128)["BLOCK_M"]
        tau, start, end, lists, poison = fused.forward_selection((u,), (1024, 512, block))
        args = (q, k, v, u, tau, start, end, lists, poison, 512, "kv", 128 ** -0.5)
        o, lse = gluon.fused_forward_gluon(*args, keys_per_tile=keys, stages=stages, rows=rows, producer_warps=0)
        for _ in range(3):                              # a race need not show on the first run
            o_ws, lse_ws = gluon.fused_forward_gluon(*args, keys_per_tile=keys, stages=stages, rows=rows,
                                                     producer_warps=4)
            torch.cuda.synchronize()
            print("diff", (o_ws.float() - o.float()).abs().max().item(), (lse_ws - lse).abs().max().item(),
                  o.float().abs().max().item())
''')


@pytest.mark.skipif(not _gluon_runs_here(), reason="needs an sm_90 GPU and Triton 3.6's Gluon API")
def test_warp_specialised_forward_equals_the_plain_one():
    """The producer partition changes who copies and how the stages are handed over, not the arithmetic, so
    both builds should agree to the bit; the bound allows one bf16 rounding step of o. A subprocess with a
    time limit turns a deadlock (a stage never filled or never released) into a failure, not a hung suite."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    try:
        result = subprocess.run([sys.executable, "-c", WS_SCRIPT], capture_output=True, text=True, env=env,
                                timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the warp-specialised forward did not finish in 300 s: a deadlock between the partitions?")
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = [[float(x) for x in line.split()[1:]] for line in result.stdout.splitlines() if line.startswith("diff")]
    assert len(diffs) == 12
    for o_diff, lse_diff, o_max in diffs:
        assert o_diff <= o_max * 2 ** -8 and lse_diff <= 1e-5, (o_diff, lse_diff, o_max)
