"""What the attention kernels compile to on an H100, without a GPU: registers, spills, shared memory, and
whether each matrix product became Hopper's wgmma or the older mma.sync.

    python -m sparsek.bench.registers                          # T = 128k, 16/16 heads, D = 128, bf16
    python -m sparsek.bench.registers --heads 32 --kv-heads 8

Each kernel is compiled for sm_90 with the host code's tiles and the specialisations a real launch at that
shape gets (pointers and integer arguments divisible by 16 are marked so, an argument equal to 1 becomes a
constant: GROUP at 16/16), then `ptxas -v` (the one Triton uses for sm_90) reports registers and spill bytes.
A product with fewer than 64 rows per warp group cannot be a wgmma; that is what made the backward's dk and dv
products slow before their tiles put 64 or more keys in the rows (docs/kernels.md). The numbers come from the
Triton installed here, which may differ from the GPU machine's: compare variants under the same Triton. Needs
Triton 3.5 or newer (its compiler and ptxas interfaces).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsek.ops.attention import fused, kernels
from sparsek.ops.common import tiles

SM90 = GPUTarget("cuda", 90, 32)
SM90_COUNT = 132            # SMs of an H100 SXM: the list pass splits its blocks by this count


def ptxas_path() -> str:
    """The ptxas Triton uses for sm_90 (Triton 3.9 ships two; the other one rejects its PTX)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(90).path


def compile_like_launch(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int):
    """triton.compile of fn for sm_90. args: every non-constexpr argument by name, a pointer as its Triton type
    ("*bf16"), a number or a tuple of integers as its value (it sets the specialisation)."""
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = constexprs.get(name, args.get(name))
        if name in constexprs or value == 1 and not isinstance(value, float):
            signature[name] = "constexpr"
            constants[(i,)] = value
        elif isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, tuple):                     # grouped integers (a tensor's strides)
            signature[name] = ("i32",) * len(value)
            attrs.update({(i, j): [["tt.divisibility", 16]] for j, v in enumerate(value) if v % 16 == 0})
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=SM90, options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(compiled) -> dict:
    """Registers and spill bytes (ptxas -v), shared memory, and the count of products of each kind: wgmma, and
    the other dots (tt.dot left after Triton's Hopper pass: mma.sync, or FMA for shapes no MMA takes)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        command = [ptxas_path(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "kernel.o")]
        report = subprocess.run(command, capture_output=True, text=True, check=True)
    info = report.stdout + report.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, info)) else 0  # noqa: E731
    ttgir = compiled.asm["ttgir"]
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), shared=compiled.metadata.shared,
                wgmma=len(re.findall(r"\bwarp_group_dot\b", ttgir)), other_dots=len(re.findall(r"\btt\.dot\b", ttgir)))


def launch_args(t_len: int, heads: int, kv_heads: int, head_dim: int, dtype: str, topk: int, window: int) -> dict:
    """The non-constexpr arguments of all four kernels at one shape (contiguous [B = 1, T, H, D] tensors)."""
    x = "*" + dtype
    pointers = {name: x for name in "Q K V OUT DO DQ DK DV".split()}
    pointers.update({name: "*fp32" for name in "U TAU LSE DELTA DTAU POISON DU DK_LIST DV_LIST DU_LIST".split()})
    pointers.update({name: "*i32" for name in "START END LISTS".split()})
    q_strides = (t_len * heads * head_dim, heads * head_dim, head_dim)           # (batch, time, head)
    kv_strides = (t_len * kv_heads * head_dim, kv_heads * head_dim, head_dim)
    return dict(pointers, q_strides=q_strides, k_strides=kv_strides, v_strides=kv_strides, o_strides=q_strides,
                T=t_len, N_SLOTS=max(1, min(topk, t_len)), WINDOW=min(window, t_len), H_Q=heads,
                GROUP=heads // kv_heads, qk_scale2=0.1, scale=0.1)


def attention_kernels(t_len: int, heads: int, kv_heads: int, head_dim: int, dtype: str, topk: int, window: int,
                      sm_count: int = SM90_COUNT) -> dict[str, dict]:
    """Resources of the forward and the three backward passes with the host code's sm_90 tiles (B = 1)."""
    args = launch_args(t_len, heads, kv_heads, head_dim, dtype, topk, window)
    dot = "ieee" if dtype == "fp32" else "tf32"
    common = dict(GATE=0, DOT=dot, HEAD_DIM=head_dim)
    forward = tiles.forward(tiles.SM90, head_dim)
    backward = tiles.backward(tiles.SM90, head_dim, heads // kv_heads)
    list_block = backward["list"]["BLOCK_M"]
    n_lists = triton.cdiv(t_len, list_block)
    slot_tiles = triton.cdiv(args["N_SLOTS"], backward["list"]["BLOCK_N"])
    chunks, blocks_per_program = fused.list_pass_chunks(n_lists, slot_tiles * kv_heads, sm_count)
    specs = {
        "forward": (kernels.sparsek_fwd_kernel, dict(N_BLOCKS=n_lists), dict(common), forward),
        "dq pass": (kernels.sparsek_bwd_dq_kernel, dict(N_BLOCKS=n_lists), dict(common, LIST_BLOCK=list_block),
                    backward["dq"]),
        "band pass": (kernels.sparsek_bwd_band_kernel, dict(N_BLOCKS=triton.cdiv(t_len, backward["band"]["BLOCK_M"])),
                      dict(common, LIST_BLOCK=list_block), backward["band"]),
        "list pass": (kernels.sparsek_bwd_list_kernel, dict(N_BLOCKS=n_lists, BLOCKS_PER_PROGRAM=blocks_per_program,
                                                             DK="*fp32", DV="*fp32"),                 # scratch
                      dict(common, ATOMIC=chunks > 1, ONE_HEAD=heads == kv_heads), backward["list"]),
    }
    out = {}
    for name, (fn, extra, constexprs, tile) in specs.items():
        tile = dict(tile)
        warps, stages = tile.pop("num_warps"), tile.pop("num_stages")
        out[name] = resources(compile_like_launch(fn, dict(args, **extra), dict(constexprs, **tile), warps, stages))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=16, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sms", type=int, default=SM90_COUNT, help="SM count (sets the list pass's split)")
    args = parser.parse_args(argv)
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    rows = attention_kernels(args.seq_len, args.heads, kv_heads, args.head_dim, args.dtype, args.topk, args.window,
                             args.sms)
    print(f"sm_90, Triton {triton.__version__}, T={args.seq_len}, heads={args.heads}/{kv_heads}, D={args.head_dim}, "
          f"{args.dtype}, topk={args.topk}, window={args.window}")
    print(f"{'kernel':>10}  registers  spill stores  spill loads  shared KB  wgmma  other dots")
    for name, r in rows.items():
        print(f"{name:>10}  {r['registers']:9d}  {r['spill_stores']:12d}  {r['spill_loads']:11d}  "
              f"{r['shared'] / 1024:9.1f}  {r['wgmma']:5d}  {r['other_dots']:10d}")


if __name__ == "__main__":
    main()
