"""Every Triton kernel compiles for an H100 (sm_90) with the tiles the host code uses, without a GPU.

The interpreter (which runs the other kernel tests on CPU) accepts code that the GPU compiler rejects, such
as a variable changing type inside an `if`. triton.compile with a CUDA target catches those in CI. It runs
in a subprocess because the interpreter setting in conftest changes what `triton.jit` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsek.ops.attention import kernels as attn
    from sparsek.ops.common import tiles as host_tiles
    from sparsek.ops.decode import fused as decode_fused
    from sparsek.ops.decode import kernels as decode_kernels
    from sparsek.ops.select import kernels as sel
    from sparsek.ops.sparsek import kernels as kept

    def compile_kernel(fn, pointers, constexprs, floats=(), num_warps=4, num_stages=2, doubles=()):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = pointers[name]
            elif name.endswith("_strides"):                # a tensor's (batch, time, head) strides, grouped
                signature[name] = ("i32", "i32", "i32")
            else:
                signature[name] = "fp32" if name in floats else "fp64" if name in doubles else "i32"
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
        print("compiled", fn.__name__, constexprs, flush=True)

    def split(tiles):
        tiles = dict(tiles)
        return tiles, tiles.pop("num_warps"), tiles.pop("num_stages")

    # One representative configuration per kernel (compiling every variant costs minutes of CI time).
    dtype = sys.argv[1]
    x = "*" + dtype
    common = dict(Q=x, K=x, V=x, U="*fp32", TAU="*fp32", START="*i32", END="*i32", LISTS="*i32")
    dot = "ieee" if dtype == "fp32" else "tf32"
    head_dim = 128 if dtype == "bf16" else 64
    tiles, warps, stages = split(host_tiles.forward(host_tiles.SM90, head_dim))
    compile_kernel(attn.sparsek_fwd_kernel, dict(common, OUT=x, LSE="*fp32", POISON="*fp32"),
                   dict(GATE=0, DOT=dot, HEAD_DIM=head_dim, **tiles), ("qk_scale2",), warps, stages)
    if dtype == "bf16":
        backward = host_tiles.backward(host_tiles.SM90, head_dim, 1)
        grads = dict(DO=x, LSE="*fp32", DELTA="*fp32")
        list_block = backward["list"]["BLOCK_M"]
        tiles, warps, stages = split(backward["dq"])
        compile_kernel(attn.sparsek_bwd_dq_kernel, dict(common, **grads, OUT=x, DQ=x, DTAU="*fp32"),
                       dict(GATE=1, DOT=dot, HEAD_DIM=head_dim, LIST_BLOCK=list_block, **tiles), ("scale",), warps,
                       stages)
        tiles, warps, stages = split(backward["band"])
        compile_kernel(attn.sparsek_bwd_band_kernel, dict(common, **grads, DK_LIST="*fp32", DV_LIST="*fp32",
                                                          DU_LIST="*fp32", DK=x, DV=x, DU="*fp32"),
                       dict(GATE=0, DOT=dot, HEAD_DIM=head_dim, LIST_BLOCK=list_block, **tiles), ("scale",), warps,
                       stages)
        tiles, warps, stages = split(backward["list"])
        compile_kernel(attn.sparsek_bwd_list_kernel, dict(common, **grads, DK="*fp32", DV="*fp32", DU="*fp32"),
                       dict(GATE=2, DOT=dot, HEAD_DIM=head_dim, ATOMIC=True, ONE_HEAD=False, **tiles), ("scale",),
                       warps, stages)
    tiles, warps, stages = split(host_tiles.decode(host_tiles.SM90, head_dim)["attend"])
    for final in (False, True):                            # partials of several splits, or one split's output
        compile_kernel(decode_kernels.decode_fwd_kernel,
                       dict(Q=x, K=x, V=x, WEIGHT="*fp32", ATTENDED="*u8", NONFINITE="*u8", OUT=x, M_PART="*fp32",
                            L_PART="*fp32", ACC_PART="*fp32"),
                       dict(GATE=0, DOT=dot, BLOCK_G=16, HEAD_DIM=head_dim, FINAL=final, FLAGGED=final, BLOCK_H=4,
                            **tiles),
                       (), warps, stages,
                       doubles=("qk_scale2",))            # torch.compile passes a Python float as fp64
    compile_kernel(decode_kernels.decode_combine_kernel, dict(M_PART="*fp32", L_PART="*fp32", ACC_PART="*fp32", OUT=x),
                   dict(BLOCK_S=decode_fused.MAX_SPLITS, HEAD_DIM=head_dim))
    cache = dict(K_NEW=x, V_NEW=x, U_NEW="*fp32", LENGTHS="*i64", KEYS=x, VALUES=x, SCORES="*fp32",
                 POSITIONS="*i64", KEPT="*fp64", DROPPED="*fp64", TAU_HINT="*fp64", WEIGHT="*fp32",
                 ATTENDED="*u8", NONFINITE="*u8")
    tiles = dict(host_tiles.cache_step(host_tiles.SM90, 8 * 1024, 1024, 1024 + 512))   # a default top-1024 cache
    warps = tiles.pop("num_warps")
    compile_kernel(decode_kernels.cache_step_kernel, cache,
                   dict(NEWTON_ITERS=16, MAX_ITERS=82, HEAD_DIM=head_dim, HAS_WINDOW=True, HAS_TOPK=True, **tiles),
                   num_warps=warps)
    if dtype == "bf16":
        compile_kernel(kept.kept_threshold_kernel, dict(Z="*fp64", TAU="*fp64"),
                       dict(NEWTON_ITERS=16, MAX_ITERS=82, BLOCK=1024))
        compile_kernel(sel.breakpoint_ranks_kernel, dict(DESC="*fp64", BY_RANK="*i64", BREAKS="*fp64",
                                                         SORTED_RANKS="*i32", VALS="*i32"), dict(CHUNK=512))
        compile_kernel(sel.keys_by_rank_kernel, dict(U="*fp64", SORTED_RANKS="*i32", VALS="*i32", WEIGHTS="*fp64"),
                       dict(CHUNK=512))
        parts = dict(PART_SEG="*i32", PART_ZEROS="*i32", PART_WEIGHT="*fp64")
        compile_kernel(sel.wavelet_count_kernel, dict(VALS="*i32", W="*fp64", **parts), dict(CHUNK=512))
        compile_kernel(sel.wavelet_write_kernel,
                       dict(VALS="*i32", W="*fp64", NEXT_VALS="*i32", NEXT_W="*fp64", ZEROS_BEFORE="*i32",
                            ONES_WEIGHT_BEFORE="*fp64", **parts, **{"NEXT_" + k: v for k, v in parts.items()}),
                       dict(CHUNK=512, PARTS_POW2=64))
        compile_kernel(sel.prefix_descend_kernel,
                       dict(ZEROS_BEFORE="*i32", ONES_WEIGHT_BEFORE="*fp64", BREAKS="*fp64", TAU="*fp64", KTH="*i32",
                            KTH_NEXT="*i32"), dict(BLOCK=256))
        compile_kernel(sel.finish_tau_kernel, dict(U="*fp64", BY_RANK="*i64", KTH="*i32", KTH_NEXT="*i32",
                                                   TAU="*fp64", CHUNK_MAX="*fp64"), dict(CHUNK=1024))
        compile_kernel(sel.key_ranges_kernel, dict(KTH="*i32", RANK_BEST="*i32", START="*i64", END="*i64"),
                       dict(CHUNK=1024))
        compile_kernel(sel.running_max_kernel, dict(X="*fp64", CHUNK_MAX="*fp64", OUT="*fp64"),
                       dict(CHUNK=1024, CHUNKS_POW2=128))
        compile_kernel(sel.evictions_kernel, dict(START="*i32", END="*i32", EVICTED_AT="*i32"), dict(CHUNK=1024))
        compile_kernel(sel.slot_parents_kernel, dict(START="*i32", END="*i32", EVICTED_AT="*i32", PARENT="*i32"),
                       dict(CHUNK=1024))
        compile_kernel(sel.follow_parents_kernel, dict(PARENT="*i32", OUT="*i32"), dict(STEPS=8, CHUNK=1024))
        compile_kernel(sel.slot_entries_kernel, dict(SLOT="*i32", START="*i32", END="*i32", LISTS="*i32"),
                       dict(BLOCK=128, CHUNK=1024))
        compile_kernel(sel.fill_lists_kernel, dict(LISTS="*i32"), dict(BLOCK_CHUNK=32, SLOT_TILE=64))
        compile_kernel(sel.fractional_ranges_kernel, dict(U="*fp32", TAU="*fp32", LO="*i32", HI="*i32",
                                                          COVER="*i32", CHUNK_COVER="*i32"),
                       dict(SCAN=1024, CHUNK=1024))
        compile_kernel(sel.fractional_shares_kernel, dict(COVER="*i32", CHUNK_COVER="*i32", GRAD_TAU="*fp32",
                                                          SHARE="*fp64", CHUNK_SHARE="*fp64"),
                       dict(SCAN=1024, SCANS_POW2=128))
        compile_kernel(sel.share_prefix_kernel, dict(SHARE="*fp64", CHUNK_SHARE="*fp64", SHARE_BEFORE="*fp64"),
                       dict(SCAN=1024, SCANS_POW2=128))
        compile_kernel(sel.add_threshold_grad_kernel, dict(SHARE_BEFORE="*fp64", LO="*i32", HI="*i32", DU="*fp32"),
                       dict(CHUNK=1024))
''')


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, dtype], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


REGISTERS_SCRIPT = textwrap.dedent('''
    import json
    from sparsek.bench.registers import attention_kernels
    # One query head per KV head and four: the band pass's tiles depend on it.
    print(json.dumps([attention_kernels(4096, 8, kv_heads, 128, "bf16", 256, 128) for kv_heads in (8, 2)]))
''')


@pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 5),
                    reason="sparsek.bench.registers needs Triton 3.5 or newer")
def test_attention_products_compile_to_wgmma():
    """Every product of the attention kernels compiles to wgmma on an H100. The band and list passes need 64 or
    more keys in the rows of their products for that (their old [queries, keys] tiles of 32 keys made the dk
    and dv products mma.sync: docs/kernels.md)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", REGISTERS_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for kernels in json.loads(result.stdout.strip().splitlines()[-1]):
        assert set(kernels) == {"forward", "dq pass", "band pass", "list pass"}
        for name, r in kernels.items():
            assert 0 < r["registers"] <= 255, (name, r)
            assert r["wgmma"] > 0 and r["other_dots"] == 0, (name, r)
