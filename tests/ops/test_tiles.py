"""The tiles of every kernel (ops/common/tiles.py), pinned: a changed tile is a deliberate edit of this file.

The GPU values are those swept on an H100 (sm_90, docs/kernels.md), which every other GPU takes too; the
interpreter's are the CPU tests' own. Plus the couplings the kernels rely on, and how a target is found.
"""

from __future__ import annotations

import types

import pytest
import torch

from sparsek.ops.common import tiles

HEAD_DIMS = (16, 32, 64, 128, 256)
GROUPS = (1, 2, 4, 8)
TARGETS = (tiles.INTERPRETER, tiles.SM90)
OTHER_GPUS = ((7, 5), (8, 0), (8, 9), (10, 0), (12, 0))

SM90_FORWARD = dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2)
SM90_DQ = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
SM90_BAND_ONE_HEAD = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3)
SM90_BAND_GQA = dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)
SM90_LIST = dict(BLOCK_M=128, BLOCK_N=128, SUB_M=32, num_warps=8, num_stages=3)
SM90_DECODE = dict(attend=dict(BLOCK_N=64, num_warps=4, num_stages=2), combine=dict(num_warps=4))
SM90_SELECTION = dict(ranks=dict(CHUNK=512), wavelet=dict(CHUNK=512), descend=dict(BLOCK=256), finish=dict(CHUNK=1024),
                      slots=dict(CHUNK=1024), lists=dict(CHUNK=1024, SLOT_TILE=64, BLOCK_CHUNK=32),
                      threshold_backward=dict(CHUNK=1024, SCAN=1024))
# Head dim 256: 8 warps and 64-key tiles, which do not spill (docs/kernels.md, "Gluon forward").
SM90_BACKWARD_WIDE = dict(dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3),
                          band=dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
                          list=dict(BLOCK_M=128, BLOCK_N=64, SUB_M=16, num_warps=8, num_stages=3))

INTERPRETER_FORWARD = dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
INTERPRETER_BACKWARD = dict(dq=dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
                            band=dict(BLOCK_M=8, BLOCK_N=16, num_warps=1, num_stages=1),
                            list=dict(BLOCK_M=32, BLOCK_N=16, SUB_M=8, num_warps=1, num_stages=1))
INTERPRETER_DECODE = dict(attend=dict(BLOCK_N=16, num_warps=1, num_stages=1), combine=dict(num_warps=1))
INTERPRETER_SELECTION = dict(ranks=dict(CHUNK=64), wavelet=dict(CHUNK=16), descend=dict(BLOCK=64),
                             finish=dict(CHUNK=16), slots=dict(CHUNK=64),
                             lists=dict(CHUNK=64, SLOT_TILE=16, BLOCK_CHUNK=4),
                             threshold_backward=dict(CHUNK=16, SCAN=8))

# Row length -> (the interpreter's chunk: the whole row; the threshold kernel's sm_90 chunk: at most 1024; the
# cache step's sm_90 chunk of kept scores: at most 2048).
ROW_CHUNKS = {0: (1, 1, 1), 1: (1, 1, 1), 5: (8, 8, 8), 100: (128, 128, 128), 1024: (1024, 1024, 1024),
              1025: (2048, 1024, 2048), 4100: (8192, 1024, 2048)}


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_sm90_attention_tiles(head_dim, group):
    assert tiles.forward(tiles.SM90, head_dim) == SM90_FORWARD
    band = SM90_BAND_GQA if group > 1 else SM90_BAND_ONE_HEAD
    want = dict(dq=SM90_DQ, band=band, list=SM90_LIST) if head_dim <= 128 else SM90_BACKWARD_WIDE
    assert tiles.backward(tiles.SM90, head_dim, group) == want


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gluon_forward_config(head_dim):
    # Up to 128: 64-key tiles, 3 stages and the producer partition (the fastest config of bench.gluon on an
    # H100). Head dim 256 takes 32-key tiles and 2 stages: 64-key tiles spill and 3 stages exceed shared memory.
    want = dict(keys_per_tile=64, stages=3, rows=None, producer_warps=4) if head_dim <= 128 else \
        dict(keys_per_tile=32, stages=2, rows=None, producer_warps=0)
    assert tiles.gluon_forward(tiles.SM90, head_dim) == want



@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gluon_dq_config(head_dim):
    # The forward's configs: at head dim 128 the fastest dq pass on an H100; its Q and dO tiles fit beside them.
    want = dict(keys_per_tile=64, stages=3, rows=None, producer_warps=4) if head_dim <= 128 else \
        dict(keys_per_tile=32, stages=2, rows=None, producer_warps=0)
    assert tiles.gluon_dq(tiles.SM90, head_dim) == want


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gluon_list_config(head_dim):
    # 128 slots, 32 query rows per step, 3 stages: no spill up to head dim 128 (ptxas); none at 256.
    want = dict(slots=128, rows=32, stages=3) if head_dim <= 128 else None
    assert tiles.gluon_list(tiles.SM90, head_dim) == want

@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_interpreter_attention_tiles(head_dim, group):
    assert tiles.forward(tiles.INTERPRETER, head_dim) == INTERPRETER_FORWARD
    assert tiles.backward(tiles.INTERPRETER, head_dim, group) == INTERPRETER_BACKWARD


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_teacher_and_selection_tiles(head_dim):
    assert tiles.decode(tiles.SM90, head_dim) == SM90_DECODE
    assert tiles.decode(tiles.INTERPRETER, head_dim) == INTERPRETER_DECODE
    warps = 8 if head_dim > 128 else 4
    assert tiles.teacher(tiles.SM90, head_dim) == dict(BLOCK_M=64, BLOCK_N=64, num_warps=warps)
    assert tiles.teacher(tiles.INTERPRETER, head_dim) == dict(BLOCK_M=32, BLOCK_N=16, num_warps=warps)
    assert tiles.selection(tiles.SM90) == SM90_SELECTION
    assert tiles.selection(tiles.INTERPRETER) == INTERPRETER_SELECTION


@pytest.mark.parametrize("n_columns", sorted(ROW_CHUNKS))
def test_threshold_and_cache_step_chunks(n_columns):
    interpreter_chunk, gpu_chunk, kept_chunk = ROW_CHUNKS[n_columns]
    assert tiles.threshold(tiles.INTERPRETER, n_columns) == dict(BLOCK=interpreter_chunk, num_warps=1)
    assert tiles.threshold(tiles.SM90, n_columns) == dict(BLOCK=gpu_chunk, num_warps=4)
    # The cache step scans its slots and entries with the threshold's chunk rule; its kept scores in chunks of
    # at most 8 in the interpreter (so that tests see several) and up to 2048 on sm_90, with 8 warps (the H200
    # sweep in tiles.cache_step).
    assert tiles.cache_step(tiles.INTERPRETER, n_columns, 5, 4100) == dict(
        BLOCK_C=min(8, interpreter_chunk), BLOCK_K=8, BLOCK_N=8192, num_warps=1)
    assert tiles.cache_step(tiles.SM90, n_columns, 5, 4100) == dict(
        BLOCK_C=kept_chunk, BLOCK_K=8, BLOCK_N=1024, num_warps=8)


@pytest.mark.parametrize("capability", OTHER_GPUS)
def test_other_gpus_take_the_sm90_tiles(capability):
    """No other GPU has been swept: each takes the sm_90 tiles (until a sweep gives it a branch, and this test a
    row of its own)."""
    for head_dim in HEAD_DIMS:
        assert tiles.forward(capability, head_dim) == tiles.forward(tiles.SM90, head_dim)
        assert tiles.decode(capability, head_dim) == tiles.decode(tiles.SM90, head_dim)
        assert tiles.teacher(capability, head_dim) == tiles.teacher(tiles.SM90, head_dim)
        for group in GROUPS:
            assert tiles.backward(capability, head_dim, group) == tiles.backward(tiles.SM90, head_dim, group)
    for n_columns in ROW_CHUNKS:
        assert tiles.threshold(capability, n_columns) == tiles.threshold(tiles.SM90, n_columns)
    assert tiles.selection(capability) == tiles.selection(tiles.SM90)


@pytest.mark.parametrize("target", TARGETS + OTHER_GPUS)
def test_backward_walks_the_forward_lists(target):
    """The list pass walks the forward's key lists, so its BLOCK_M is the forward's; the dq and band passes take
    the list and band of the list block holding each of their query tiles, so their BLOCK_M divides it
    (attention/kernels.py)."""
    for head_dim in HEAD_DIMS:
        for group in GROUPS:
            backward = tiles.backward(target, head_dim, group)
            list_block = backward["list"]["BLOCK_M"]
            assert list_block == tiles.forward(target, head_dim)["BLOCK_M"]
            assert list_block % backward["list"]["SUB_M"] == 0
            for name in ("dq", "band"):
                assert list_block % backward[name]["BLOCK_M"] == 0, (target, head_dim, group, name)


def test_each_call_returns_new_dicts():
    """Callers may change what they get (kept_threshold_triton sets a test's BLOCK) without changing the table."""
    tiles.threshold(tiles.SM90, 100)["BLOCK"] = 1
    tiles.forward(tiles.SM90, 128)["BLOCK_M"] = 1
    tiles.backward(tiles.SM90, 128, 1)["list"]["BLOCK_M"] = 1
    assert tiles.threshold(tiles.SM90, 100)["BLOCK"] == 128
    assert tiles.forward(tiles.SM90, 128) == SM90_FORWARD
    assert tiles.backward(tiles.SM90, 128, 1)["list"] == SM90_LIST


def test_target_asks_the_device_once(monkeypatch):
    """Under the interpreter no device is asked; on a GPU its capability is asked once per device index and then
    cached, so a decode step pays nothing for it (and torch.compile traces no query)."""
    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(major=9, minor=0, multi_processor_count=132)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    # Device indices no machine has, as the cache keeps the fake answers.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tiles.target(torch.device("cuda", 120)) == tiles.INTERPRETER
    assert tiles.target(torch.device("cpu")) == tiles.INTERPRETER
    assert asked == []
    monkeypatch.delenv("TRITON_INTERPRET")
    for _ in range(3):
        assert tiles.target(torch.device("cuda", 120)) == tiles.SM90
    assert asked == [120]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 121)
    assert tiles.target(torch.device("cuda")) == tiles.SM90                 # no index: the current device
    assert asked == [120, 121]
    assert tiles.sm_count(torch.device("cuda", 120)) == 132 and asked == [120, 121]    # the same one answer
