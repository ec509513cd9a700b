"""The C block attention (ops/attention/native.c), which the gathered path runs for float32 CPU tensors: against
the float64 reference and the PyTorch gathered path, outputs and all four gradients, with blocks of 4 queries
(padding columns, partial blocks) and the default 16, split between threads, and the fallbacks."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from sparsek.ops.attention import gathered
from sparsek.ops.attention import native as native_attention
from sparsek.ops.attention.gathered import sparsek_attention_gathered
from sparsek.ops.attention.reference import sparsek_attention_reference

from .test_attention_gathered import CASES, exact, make_inputs, outputs_and_grads

pytestmark = pytest.mark.skipif(not native_attention.available(), reason="no C compiler: the C attention cannot be "
                                "built (the gathered path then runs in PyTorch, tested in test_attention_gathered)")

NAMES = ["out", "dq", "dk", "dv", "dscores"]


@pytest.fixture(params=["saved", "recomputed"])
def keep(request, monkeypatch):
    """Both sources of the backward's blocks: kept by the forward, or recomputed (as for long rows)."""
    if request.param == "recomputed":
        monkeypatch.setattr(native_attention, "_SAVED_FLOATS", 0)
    return request.param


def cotangent_for(inputs):
    return torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def pytorch_gathered(monkeypatch, inputs, cotangent, **kwargs):
    """The same call with the C attention unavailable: gathered.py's own PyTorch chunks."""
    with monkeypatch.context() as m:
        m.setattr(native_attention, "available", lambda: False)
        return outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)


def test_float32_runs_in_c(monkeypatch):
    calls = []
    original = native_attention.native_sparsek_attention
    monkeypatch.setattr(native_attention, "native_sparsek_attention",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    sparsek_attention_gathered(*make_inputs(1, 20, 2, 1, 8, dtype=torch.float32), topk=3, window=2)
    assert calls == [1]
    sparsek_attention_gathered(*make_inputs(1, 20, 2, 1, 8), topk=3, window=2)          # float64: PyTorch
    assert calls == [1]


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_the_float64_reference_and_the_pytorch_path(monkeypatch, block, case, keep):
    """float32 in C: within twice the float32 PyTorch reference's error of the float64 reference (plus 1e-6 and two
    float32 units of the largest entry), and within 1e-5 of the PyTorch gathered path in float32; the backward
    from the forward's saved blocks, and recomputing them (long rows)."""
    monkeypatch.setattr(gathered, "BLOCK", block)
    batch, t_len, hq, hk, d, topk, window, gate = case
    kwargs = dict(topk=topk, window=window, gate=gate)
    inputs = make_inputs(batch, t_len, hq, hk, d, dtype=torch.float32, seed=t_len + topk)
    cotangent = cotangent_for(inputs)
    got = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    plain = outputs_and_grads(sparsek_attention_reference, inputs, cotangent, **kwargs)
    torch_path = pytorch_gathered(monkeypatch, inputs, cotangent, **kwargs)
    want = exact(inputs, cotangent, **kwargs)
    for name, g, p, t, w in zip(NAMES, got, plain, torch_path, want):
        if w is None:
            assert g is None and gate == "none" and name == "dscores"
            continue
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        err, err_plain = (g.double() - w).abs().max().item(), (p.double() - w).abs().max().item()
        # plus two float32 units of the largest entry: a gradient summed from terms of either sign (the scores')
        # can land a unit or two from the reference's on luck alone (median error ratio over 40 seeds: 1.1x)
        bound = 2 * err_plain + 1e-6 + 2 * torch.finfo(torch.float32).eps * w.abs().max().item()
        assert err <= bound, f"{name}: {err} vs the float32 reference's {err_plain}"
        torch.testing.assert_close(g, t, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n} against PyTorch: {m}")


@pytest.mark.parametrize("gate", ["kv", "v"])
def test_tied_scores_and_wide_heads(monkeypatch, gate):
    """Integer scores (ties everywhere), head dim 80 (a partial vector of 16 floats), GQA 3/1."""
    monkeypatch.setattr(gathered, "BLOCK", 4)
    kwargs = dict(topk=4, window=3, gate=gate)
    inputs = make_inputs(2, 29, 3, 1, 80, dtype=torch.float32, seed=5, ties=True)
    cotangent = cotangent_for(inputs)
    got = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    for name, g, t in zip(NAMES, got, pytorch_gathered(monkeypatch, inputs, cotangent, **kwargs)):
        torch.testing.assert_close(g, t, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_threads_split_the_blocks(monkeypatch, keep):
    """Blocks split between OpenMP threads, each adding key gradients into buffers of its own, give the
    one-thread results."""
    inputs = make_inputs(2, 150, 4, 2, 16, dtype=torch.float32, seed=3)
    cotangent = cotangent_for(inputs)
    kwargs = dict(topk=9, window=7)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(native_attention, "_PAIRS_PER_THREAD", 1)
    counts = []
    original = native_attention._threads
    monkeypatch.setattr(native_attention, "_threads", lambda pairs: counts.append(original(pairs)) or counts[-1])
    split = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    assert counts == [3]
    assert native_attention.openmp() or shutil.which("gcc") is None     # gcc builds it with OpenMP
    for name, a, b in zip(NAMES, split, one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_under_activation_checkpointing(keep):
    """Checkpointing recomputes the forward before the backward, into new tensors: the same gradients."""
    inputs = make_inputs(1, 70, 4, 2, 16, dtype=torch.float32, seed=8)
    cotangent = cotangent_for(inputs)
    kwargs = dict(topk=6, window=5)
    plain = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)

    def checkpointed(*args, **kw):
        return checkpoint(lambda *a: sparsek_attention_gathered(*a, **kw), *args, use_reentrant=False)

    for name, a, b in zip(NAMES, outputs_and_grads(checkpointed, inputs, cotangent, **kwargs), plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_half_precision_and_non_finite_keys():
    """float16 runs in C on float32 copies; a NaN key sends the call to the PyTorch pair path, which keeps it
    from the queries that do not attend it."""
    inputs = make_inputs(1, 30, 2, 1, 16, dtype=torch.float16, seed=9)
    out = sparsek_attention_gathered(*inputs, topk=3, window=2)
    assert out.dtype == torch.float16
    want = sparsek_attention_reference(*[x.double() for x in inputs], topk=3, window=2)
    torch.testing.assert_close(out.double(), want, atol=5e-3, rtol=0)
    q, k, v, u = make_inputs(1, 27, 4, 2, 8, dtype=torch.float32, seed=13)
    v[0, -1, 1] = float("nan")
    out = sparsek_attention_gathered(q, k, v, u, topk=3, window=3)
    assert torch.isnan(out[0, -1, 2:]).all() and torch.isfinite(out[0, :-1]).all()


def test_finite_values_whose_sum_overflows():
    """The C path is taken where k and v sum to a finite number; values near the float32 limit overflow that sum
    and go to the PyTorch path, still exact."""
    q, k, v, u = make_inputs(1, 27, 4, 2, 8, dtype=torch.float32, seed=14)
    v[0, :, :, 0] = 3e38
    out = sparsek_attention_gathered(q, k, v, u, topk=3, window=3)
    want = sparsek_attention_reference(q.double(), k.double(), v.double(), u.double(), topk=3, window=3)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-6)


def test_without_a_compiler_the_pytorch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPARSEK_CACHE", str(tmp_path / "cache"))
    native_attention._library.cache_clear()
    try:
        assert not native_attention.available()
        inputs = make_inputs(1, 33, 2, 1, 8, dtype=torch.float32, seed=2)
        out = sparsek_attention_gathered(*inputs, topk=4, window=3)
        want = sparsek_attention_reference(*[x.double() for x in inputs], topk=4, window=3)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    finally:
        native_attention._library.cache_clear()


def test_a_native_build_is_cached_per_cpu(monkeypatch, tmp_path):
    """-march=native code runs only on the CPU it was built for: a cache folder shared with another machine
    (another CPU) builds a second library instead of loading the first."""
    from sparsek.ops.common import clib

    monkeypatch.setenv("SPARSEK_CACHE", str(tmp_path))
    native_attention._library.cache_clear()
    try:
        assert native_attention.available()
        assert len(list(tmp_path.glob("attention_*.so"))) == 1
        monkeypatch.setattr(clib, "_cpu", lambda: "another CPU")
        native_attention._library.cache_clear()
        assert native_attention.available()
        assert len(list(tmp_path.glob("attention_*.so"))) == 2
    finally:
        native_attention._library.cache_clear()


def test_bunched_scores_take_the_reference_thresholds(monkeypatch, keep):
    """Where native.c's sweep gives up (scores bunched within 1, past its work budget), the one-call forward takes
    the reference's thresholds and still matches the float64 reference."""
    from sparsek.ops.select import native as native_selection

    monkeypatch.setattr(native_selection, "_WORK_PER_PREFIX", 0)
    q, k, v, u = make_inputs(2, 40, 4, 2, 8, dtype=torch.float32, seed=21)
    u = (0.01 * u).detach().requires_grad_()                                 # all within 1 of each other
    inputs = [q, k, v, u]
    calls = []
    original = native_attention._select
    monkeypatch.setattr(native_attention, "_select", lambda *a: calls.append(1) or original(*a))
    cotangent = cotangent_for(inputs)
    kwargs = dict(topk=5, window=3)
    got = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    assert calls
    for name, g, w in zip(NAMES, got, exact(inputs, cotangent, **kwargs)):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_thresholds_float32_cannot_hold_raise():
    """Scores near 2e5 (uncentred): float32 would round tau by 2^-7, so the C selection refuses, as the
    reference does."""
    q, k, v, u = make_inputs(1, 30, 2, 1, 8, dtype=torch.float32, seed=4)
    with pytest.raises(ValueError, match="too large for torch.float32 thresholds"):
        sparsek_attention_gathered(q, k, v, u + 2e5, topk=3, window=2)


def test_a_linked_source_is_part_of_the_build_key(monkeypatch, tmp_path):
    """The attention library links ops/select/native.c in: editing that file alone must build a new library,
    not load the cached one with the old selection."""
    from sparsek.ops.common import clib

    main, linked = tmp_path / "main.c", tmp_path / "linked.c"
    main.write_text("int linked_value(void);\nint value(void) { return linked_value(); }\n")
    linked.write_text("int linked_value(void) { return 1; }\n")
    monkeypatch.setenv("SPARSEK_CACHE", str(tmp_path / "cache"))
    flags = [["-O1", "-shared", "-fPIC"]]
    assert clib.build(main, flags, also=(linked,)).value() == 1
    linked.write_text("int linked_value(void) { return 2; }\n")
    assert clib.build(main, flags, also=(linked,)).value() == 2
    assert len(list((tmp_path / "cache").glob("*.so"))) == 2


def test_fewer_threads_than_asked(monkeypatch, tmp_path):
    """Key gradients are summed over the threads that ran, not the threads asked for: a build without OpenMP
    asked for two (or an OpenMP team cut short by OMP_THREAD_LIMIT) gives the one-thread gradients."""
    inputs = make_inputs(1, 200, 4, 2, 16, dtype=torch.float32, seed=12)
    cotangent = cotangent_for(inputs)
    kwargs = dict(topk=9, window=7)
    want = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    monkeypatch.setattr(native_attention, "_FLAG_SETS", [f for f in native_attention._FLAG_SETS if "-fopenmp" not in f])
    monkeypatch.setenv("SPARSEK_CACHE", str(tmp_path))
    native_attention._library.cache_clear()
    try:
        assert native_attention.available() and not native_attention.openmp()
        monkeypatch.setattr(native_attention, "_threads", lambda pairs: 2)
        got = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, **kwargs)
    finally:
        native_attention._library.cache_clear()
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_a_topk_far_beyond_t_is_full_causal_attention():
    """topk >= T selects every key: 2^61 (whose heap size would wrap around) gives the topk = T result."""
    inputs = make_inputs(1, 30, 2, 1, 8, dtype=torch.float32, seed=6)
    want = sparsek_attention_gathered(*inputs, topk=30, window=2)
    torch.testing.assert_close(sparsek_attention_gathered(*inputs, topk=2 ** 61, window=2), want, atol=0, rtol=0)


def test_under_another_default_dtype(monkeypatch):
    """The C path's buffers are float32 whatever torch's default dtype: float64 there gives the same gradients."""
    inputs = make_inputs(1, 40, 4, 2, 8, dtype=torch.float32, seed=7)
    cotangent = cotangent_for(inputs)
    want = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, topk=5, window=3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = outputs_and_grads(sparsek_attention_gathered, inputs, cotangent, topk=5, window=3)
    finally:
        torch.set_default_dtype(default)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
