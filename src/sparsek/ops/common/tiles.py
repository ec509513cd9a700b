"""Tile sizes of every Triton kernel, in one place, keyed on what they depend on: the target, the head dim D,
the GQA group G = Hq // Hk and, for the threshold scans, the row length.

A target is INTERPRETER (TRITON_INTERPRET=1: kernels run on the CPU) or a GPU's compute capability, such as
SM90 = (9, 0) for Hopper. The interpreter's tiles are small, so that the CPU tests stay fast and see several
tiles per row. The GPU tiles were swept on an H100 (sm_90, docs/kernels.md) or say that they were not swept;
every other GPU takes them too, until a sweep on it adds a branch for its capability. Each call returns new
dicts, which the caller may change. tests/ops/test_tiles.py pins every value.

`target(device)` asks nothing under the interpreter and asks a GPU for its capability once per process,
cached per device index with its SM count (`sm_count`, which sizes the grids): picking tiles costs no host
synchronisation.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting

INTERPRETER = "interpreter"
SM90 = (9, 0)
Target = str | tuple[int, int]


def target(device: torch.device) -> Target:
    """The target of kernels launched for tensors on `device`: INTERPRETER under TRITON_INTERPRET=1, else the
    capability of that CUDA device (the current one for a device without an index)."""
    if interpreting():
        return INTERPRETER
    return _properties(device)[:2]


def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (the current one for a device without an index), asked
    once per process: the launch grids that aim at a few programs per SM read it on every call."""
    return _properties(device)[2]


def _properties(device: torch.device) -> tuple[int, int, int]:
    """(major, minor, SM count) of a CUDA device, cached per device index."""
    return _properties_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _properties_of(device_index: int) -> tuple[int, int, int]:
    properties = torch.cuda.get_device_properties(device_index)
    return properties.major, properties.minor, properties.multi_processor_count


def _next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 for n >= 1, without importing triton (an optional extra)."""
    return 1 << (n - 1).bit_length()


def forward(target: Target, head_dim: int) -> dict:
    """Tiles of the attention forward (`sparsek_fwd_kernel`); its BLOCK_M is the block of the key lists, which
    the backward's list pass reuses."""
    if target == INTERPRETER:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
    # Picked by a sweep on an H100 (T = 32k, D = 128, bf16): see docs/kernels.md.
    return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2)


def gluon_forward(target: Target, head_dim: int) -> dict:
    """The Gluon forward's config on sm_90 (`ops/attention/gluon.py`): keys per tile, shared-memory ring stages,
    query rows per program (None: the lists' block) and producer warps (0: no warp-specialised producer). Its
    query blocks are the tl forward's (the key lists are shared), so there is no interpreter entry."""
    if head_dim > 128:
        # 32-key tiles and 2 stages fit head dim 256 in 132 KB of shared memory and 245 registers without spills
        # (ptxas); 64-key tiles spill. H100, 32k: 3.5x the tl forward; the producer partition was 5% slower.
        return dict(keys_per_tile=32, stages=2, rows=None, producer_warps=0)
    # `python -m sparsek.bench.gluon` on an H100 (D = 128, 8k-128k, docs/kernels.md): 3 stages of 64 keys filled
    # by a 4-warp producer partition, 1.12-1.18x the tl forward; the same ring without the producer 1.01-1.08x;
    # 2 stages, 32-key tiles and 64-row programs slower than either. Head dim 64 (32k): 1.15x the tl forward.
    return dict(keys_per_tile=64, stages=3, rows=None, producer_warps=4)


def gluon_dq(target: Target, head_dim: int) -> dict:
    """The Gluon dq pass's config on sm_90 (`gluon.dq_pass_gluon`), in the settings of `gluon_forward`."""
    if head_dim > 128:
        # Not timed: the forward's 32-key tiles and 2 stages (Q and dO take 128 KB at head dim 256); it passes
        # the GPU tests.
        return dict(keys_per_tile=32, stages=2, rows=None, producer_warps=0)
    # `python -m sparsek.bench.gluon` on an H100 (D = 128, 8k and 32k): the forward's config, 64-key tiles, 3
    # stages and a 4-warp producer, was the fastest but once (8k: 0.4% behind the same ring without the
    # producer), 1.27-1.32x the tl dq pass; 32-key tiles were 7-8% slower, 64-row programs 11-13%.
    return dict(keys_per_tile=64, stages=3, rows=None, producer_warps=4)


def gluon_list(target: Target, head_dim: int) -> dict | None:
    """The Gluon list pass's config on sm_90 (`gluon.list_pass_gluon`): slots per program (the keys of its
    wgmma rows, 16 per warp), query rows per step and ring stages; None where it has none (head dim 256: its
    dK and dV accumulators spill, 5 KB per thread at 64 slots and 32 rows, ptxas)."""
    if head_dim > 128:
        return None
    # ptxas (sm_90a): 128 slots with 64 rows per step spill 0.8 KB; 32 rows and 3 stages none (255 registers,
    # 176 KB of shared memory). Not yet timed on a GPU.
    return dict(slots=128, rows=32, stages=3)


def backward(target: Target, head_dim: int, group: int) -> dict[str, dict]:
    """Tiles of the dq, band and list passes for `group` query heads per KV head. The list pass walks the
    forward's list blocks (its BLOCK_M is the forward's), which fix which (query, key) pairs belong to the band
    and which to the lists. The dq and band passes walk query tiles that divide a list block (smaller tiles
    keep their bands short) and split the pairs the same way. The band and list passes put 64 or more keys in
    a tile, so that their products compile to Hopper's wgmma (attention/kernels._bwd_tile)."""
    list_block = forward(target, head_dim)["BLOCK_M"]
    if target == INTERPRETER:
        # Small, and not square where keys are the rows, so that a swapped axis fails the tests on CPU.
        tile = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
        return dict(dq=tile, band=dict(tile, BLOCK_M=8), list=dict(tile, BLOCK_M=list_block, SUB_M=8))
    # Picked by sweeps on an H100 (T = 8k-128k, D = 128, bf16, 16/16 and 32/8 heads): see docs/kernels.md.
    # Band tiles by GQA ratio: 128 keys and 8 warps when a key tile serves several query heads (band pass at
    # 32/8 heads, 128k: 7.8 against 8.7 ms), 64 keys and 4 warps, two programs per SM, when it serves one (at
    # 16/16: 4.4 against 5.2 ms).
    if head_dim > 128:
        # Head dim 256: the tiles above spill (band 5.7 KB, list 3.7 KB per thread, ptxas); 8 warps and 64-key
        # tiles cut that to 0.2-0.4 KB (forward + backward at 32k, 16/16: 41.3 -> 30.6 ms on an H100).
        return dict(dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3),
                    band=dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
                    list=dict(BLOCK_M=list_block, BLOCK_N=64, SUB_M=16, num_warps=8, num_stages=3))
    band = dict(BLOCK_M=32, BLOCK_N=128, num_warps=8) if group > 1 else dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)
    return dict(dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3), band=dict(band, num_stages=3),
                list=dict(BLOCK_M=list_block, BLOCK_N=128, SUB_M=32, num_warps=8, num_stages=3))


def decode(target: Target, head_dim: int) -> dict[str, dict]:
    """Tiles of decode attention: its split kernel (`decode_fwd_kernel`) and the merge of the splits
    (`decode_combine_kernel`, whose BLOCK_S is the split count's power of two, not a tile)."""
    if target == INTERPRETER:
        return dict(attend=dict(BLOCK_N=16, num_warps=1, num_stages=1), combine=dict(num_warps=1))
    # Not yet swept on a GPU: 64 entries x D <= 128 keeps a k and a v tile of one stage within 32 KiB.
    return dict(attend=dict(BLOCK_N=64, num_warps=4, num_stages=2), combine=dict(num_warps=4))


def threshold(target: Target, n_columns: int) -> dict:
    """Chunk of the threshold scans over a row of n_columns scores (`kept_threshold_kernel`)."""
    if target == INTERPRETER:
        # One chunk per row: the interpreter's cost is per operation, not per element.
        return dict(BLOCK=_next_power_of_2(max(n_columns, 1)), num_warps=1)
    # Not yet swept on a GPU: 4 warps and 1024-entry chunks (a 4100-entry row of a top-1024 cache is 5 chunks).
    return dict(BLOCK=min(1024, _next_power_of_2(max(n_columns, 1))), num_warps=4)


def cache_step(target: Target, n_kept: int, topk: int, n_entries: int) -> dict:
    """Chunks of the fused cache step (`cache_step_kernel`), whose passes scan its kept scores (BLOCK_C), its
    top-k slots (BLOCK_K) and its N entries (BLOCK_N). The slots and entries take the kept threshold's chunk
    rule; the kept scores, the step's hot loop, have their own on a GPU."""
    scans = dict(BLOCK_K=threshold(target, topk)["BLOCK"], BLOCK_N=threshold(target, n_entries)["BLOCK"])
    if target == INTERPRETER:
        # Kept chunks of 8, so that the tests' buffers (2 to 64 columns) take several, as the GPU's 8192 do.
        return dict(scans, BLOCK_C=min(8, threshold(target, n_kept)["BLOCK"]), num_warps=1)
    # H200 sweep (2026-12-05, top-1024 cache with 8192 kept scores, B = 1 and 8; docs/kernels.md): kept chunks
    # of 2048 with 8 warps took 20-22 us per update, against 28-31 with 1024 and 4; chunks of 4096 or more
    # spill registers (8192 with 16 warps: 74 us).
    return dict(scans, BLOCK_C=min(2048, _next_power_of_2(max(n_kept, 1))), num_warps=8)


def teacher(target: Target, head_dim: int) -> dict:
    """Tiles of the teacher-mass kernels (`teacher_lse_kernel`, `teacher_column_kernel`)."""
    warps = 8 if head_dim > 128 else 4
    if target == INTERPRETER:
        # Small tiles keep CPU tests fast; keys as rows in the column pass (16 x 32) catch a swapped axis.
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=warps)
    # No sweep recorded in docs/kernels.md.
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=warps)


def selection(target: Target) -> dict[str, dict]:
    """Chunks of the selection's kernels (ops/select/fused.py), by stage: the rank sequences
    (`breakpoint_ranks_kernel`, `keys_by_rank_kernel`), the wavelet levels, the threshold descent, its finish
    (`finish_tau_kernel`, `running_max_kernel`, `key_ranges_kernel`), the slots' pointer jumping, the block
    lists (`slot_entries_kernel` in CHUNK, `fill_lists_kernel` in SLOT_TILE x BLOCK_CHUNK) and the thresholds'
    backward (CHUNK per program, SCAN per prefix-sum chunk). Triton's default warps and stages everywhere."""
    if target == INTERPRETER:
        # Small, so that the tests' short rows take several chunks and segments.
        return dict(ranks=dict(CHUNK=64), wavelet=dict(CHUNK=16), descend=dict(BLOCK=64), finish=dict(CHUNK=16),
                    slots=dict(CHUNK=64), lists=dict(CHUNK=64, SLOT_TILE=16, BLOCK_CHUNK=4),
                    threshold_backward=dict(CHUNK=16, SCAN=8))
    # On an H100 (docs/kernels.md): wavelet chunks of 512 entries, 4 per thread, were the fastest; the descent
    # took the same time with blocks of 64-512 queries. No sweep of the other chunks is recorded.
    return dict(ranks=dict(CHUNK=512), wavelet=dict(CHUNK=512), descend=dict(BLOCK=256), finish=dict(CHUNK=1024),
                slots=dict(CHUNK=1024), lists=dict(CHUNK=1024, SLOT_TILE=64, BLOCK_CHUNK=32),
                threshold_backward=dict(CHUNK=1024, SCAN=1024))
