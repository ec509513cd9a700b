"""Constant-memory KV cache of one SparseK attention layer, and exact token-by-token decoding.

Shape legend: B batch, H KV heads, Hq query heads (G = Hq // H per KV head), D head dim, k = topk slots,
w = window, N = w + k cache entries, C = max_kept scalar scores kept for the threshold.

Per batch row and KV head the cache holds (SPEC section 4), in one buffer of N entries:
  * entries [0, w): the window, a ring of the w newest keys and values (token p sits at p % w);
  * entries [w, w + k): the selection, k slots holding the top-k of all older tokens (the candidates);
  * the C best candidate scores, for the threshold: a key leaves the top-k for good, and tau never falls
    below min(theta - 1, u_(k+1)) (theta the k-th best score, u_(k+1) the next), so low scores cannot move it.
    They are scalars; the KV memory is N pairs whatever the context length (see `SparseKCache` on when a
    fixed C keeps tau exact).
Decoding one token: it enters the window; the token leaving the window becomes a candidate and, if it beats
the worst selected key (ties go to the newer key), takes its slot; tau is the SPARSEK threshold of the kept
scores; the query attends to the window (m = 1) and the slots (m = clip(u - tau, 0, 1)), as in the parallel
forward. Rows may hold different numbers of tokens (prompts of different lengths, left padded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops.common import check_backend, check_budget, check_gate, check_scale, kernel_for
from .ops.decode import decode_attention_reference
from .ops.select import best_first_order
from .ops.sparsek.kept import kept_threshold, kept_threshold_reference

try:
    from .ops.decode import fused as decode_fused
except ImportError:  # triton is an optional extra: the PyTorch step
    decode_fused = None

# Default bound on the kept scores: max_kept = max(KEPT_PER_SLOT * topk, MIN_KEPT). A power of two for a
# power-of-two topk, so the fused step scans the buffer in whole chunks; small topk needs relatively more room
# (see SparseKCache).
KEPT_PER_SLOT, MIN_KEPT = 8, 64


def _int_vector(name: str, value, what: str) -> Tensor:
    """value, a 1-D integer tensor or a list of ints, as a tensor; otherwise a ValueError naming `name`."""
    if isinstance(value, (list, tuple)) and not any(isinstance(x, bool) or not isinstance(x, int) for x in value):
        value = torch.tensor(value, dtype=torch.int64)
    if (not isinstance(value, Tensor) or value.dim() != 1 or value.is_floating_point() or value.is_complex()
            or value.dtype == torch.bool):
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
        raise ValueError(f"{name} must be a 1-D integer tensor or a list of ints {what}, got {got:.120}")
    return value


class SparseKCache:
    """Window ring + k selected slots + kept candidate scores for one layer. Build with `prefill`.

    max_kept is the size of the kept-score buffer per (row, KV head): "auto" (default) is max(8 topk, 64), an int
    must be >= topk + 1. The buffer holds the max_kept best candidate scores seen so far: a new candidate that
    beats the lowest takes its column (the first such column), otherwise it is dropped; the cache remembers,
    per (row, KV head), the best score it ever dropped (`dropped_u`). Every tensor has a fixed size, so
    `nbytes()` is constant in the context like `kv_bytes()`, and a decode step has static shapes and no host
    work: it can be captured in a CUDA graph or compiled. For a cache that is exact whatever the scores, pass
    max_kept at least the number of tokens it will see. What stays exact:
      * the selection (which keys sit in the slots, and their KV) never depends on the kept scores: gate "none"
        decodes like the parallel forward whatever max_kept;
      * tau, the weights m = clip(u - tau, 0, 1) and the outputs, at every step where tau >= every dropped score
        (`exact()`): the dropped scores then weigh 0, and as the buffer holds the best scores, the (k+1)-th
        best is in it too, so tau equals that of all candidates (and of the parallel forward) up to rounding.
        A dropped score below min(theta - 1, u_(k+1)) (theta the k-th best) can never reach tau again: tau
        never falls below that bound. With the scorer's recency slope (0.01 per position, plus uniform [0, 1)
        noise) the most candidates above tau in 600 steps were 12, 40 and 122 for k = 1, 8, 64: under
        the default's 64, 64 and 512 columns, so the default stays exact there;
      * otherwise, more than max_kept candidates above tau (scores stationary within 1 of each other), tau comes
        out lower than the exact one, never higher, so the slot weights m are larger (tests/test_cache_safety.py
        measures both cases).
    """

    # The decoding state, each tensor per batch row.
    _STATE = ("keys", "values", "scores", "positions", "kept_u", "dropped_u", "lengths")
    # Every tensor the cache holds: the state, and the fused step's first probe for tau (the kept scores' last
    # tau), which any value leaves exact, so it is no part of the state that the two steps must agree on.
    _BUFFERS = _STATE + ("tau_hint",)

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, topk: int, window: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", score_dtype: torch.dtype = torch.float32,
                 max_kept: int | str = "auto"):
        check_budget(topk, window)
        if max_kept is None:
            raise ValueError("max_kept=None (a kept-score buffer that grows) is gone: the buffer has a fixed size so "
                             "that a decode step has static shapes; pass an int at least the number of tokens for "
                             "a cache that is exact whatever the scores")
        if max_kept == "auto":
            max_kept = max(KEPT_PER_SLOT * topk, MIN_KEPT)
        if isinstance(max_kept, bool) or not isinstance(max_kept, int) or max_kept < topk + 1:
            raise ValueError(f"max_kept must be 'auto' or an int >= topk + 1 = {topk + 1}, got {max_kept!r}")
        self.topk, self.window, self.max_kept = topk, window, max_kept
        shape = (batch, n_kv_heads, window + topk)
        self.keys = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        # Scores in float32, or float64 when the scores are (the parallel path selects in their precision).
        self.scores = torch.zeros(shape, dtype=score_dtype, device=device)
        self.positions = torch.full(shape, -1, dtype=torch.int64, device=device)      # -1: empty entry
        # The max_kept best candidate scores, -inf in unused columns. The finite ones fill a prefix of the
        # columns, at most one per candidate so far: prefill writes them first, and a step writes the first
        # lowest column, the first empty one while any is. The fused step scans only that prefix.
        self.kept_u = torch.full((batch, n_kv_heads, max_kept if topk else 0), -torch.inf, dtype=torch.float64,
                                 device=device)
        # Best score the buffer dropped (-inf: none): tau at or above it means tau is exact.
        self.dropped_u = torch.full((batch, n_kv_heads), -torch.inf, dtype=torch.float64, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)            # tokens seen per row
        self.tau_hint = torch.full((batch, n_kv_heads), -torch.inf, dtype=torch.float64, device=device)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def kv_bytes(self) -> int:
        """Bytes of cached keys and values (the part that scales with head_dim): constant in the context."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (the kept scalar scores included: max_kept per row and head)."""
        return sum(getattr(self, name).nbytes for name in self._BUFFERS)

    def copy_(self, other: SparseKCache) -> None:
        """Take the state of a cache of the same shapes, in place (tensor addresses kept: CUDA-graph safe)."""
        for name in self._BUFFERS:
            getattr(self, name).copy_(getattr(other, name))

    def select_rows(self, index: Tensor | list[int]) -> None:
        """Keep batch rows `index` [B'] (beam search reorders rows, sampling repeats them): ints in [-B, B),
        repeats allowed. A bad index is a ValueError before anything changes; checking its range waits for the
        device once. New tensors: a CUDA graph captured before this no longer sees the cache."""
        index = _int_vector("index", index, "of batch rows").to(self.keys.device)
        # Checked here: an out-of-range index_select on CUDA is a device assert, not an exception.
        if index.numel() and not (-self.batch <= index.min() and index.max() < self.batch):
            raise ValueError(f"index must hold rows in [-{self.batch}, {self.batch}) (the cache's batch), "
                             f"got {index.tolist()[:16]}")
        index = torch.where(index < 0, index + self.batch, index)
        for name in self._BUFFERS:
            setattr(self, name, getattr(self, name).index_select(0, index))

    @classmethod
    def prefill(cls, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int,
                lengths: Tensor | None = None, max_kept: int | str = "auto") -> SparseKCache:
        """The cache after a prompt: k, v [B, T, H, D], scores [B, T, H] (the same the parallel forward saw).

        lengths [B]: real tokens per row, right-aligned (row b's prompt is the last lengths[b] positions, the
        rest is left padding); all T when None. max_kept: the bound on kept scores (see `SparseKCache`).
        """
        for name, x in (("k", k), ("v", v), ("scores", scores)):
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if k.dim() != 4 or v.shape != k.shape or scores.shape != k.shape[:3] or not scores.is_floating_point():
            raise ValueError(f"need k, v [B, T, H, D] and float scores [B, T, H], got {tuple(k.shape)}, "
                             f"{tuple(v.shape)}, {tuple(scores.shape)} {scores.dtype}")
        batch, t_len, heads, head_dim = k.shape
        score_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        cache = cls(batch, heads, head_dim, topk, window, k.dtype, k.device, score_dtype, max_kept)
        lengths = cls._check_lengths(lengths, batch, t_len)
        for b, n in enumerate(lengths.tolist()):  # once per prompt: a loop over rows keeps the indexing plain
            candidates = cache._fill_row(b, k[b, t_len - n:], v[b, t_len - n:], scores[b, t_len - n:])
            if topk and candidates.shape[-1]:
                ranked = candidates.sort(dim=-1, descending=True).values                      # [H, n - w]
                width = min(cache.max_kept, ranked.shape[-1])
                cache.kept_u[b, :, :width] = ranked[:, :width]
                if ranked.shape[-1] > width:
                    cache.dropped_u[b] = ranked[:, width]
        cache.lengths = lengths.to(k.device, copy=True)  # updated in place while decoding
        return cache

    @staticmethod
    def _check_lengths(lengths: Tensor | list[int] | None, batch: int, t_len: int) -> Tensor:
        """lengths (a tensor or list of ints, or None for all t_len) as an int64 CPU tensor [B] in [0, T]."""
        if lengths is None:
            return torch.full((batch,), t_len, dtype=torch.int64)
        lengths = _int_vector("lengths", lengths, f"[B] = [{batch}]")
        lengths = lengths.to(torch.int64).cpu()
        if lengths.shape != (batch,) or (lengths < 0).any() or (lengths > t_len).any():
            raise ValueError(f"lengths must be [B] = [{batch}] in [0, {t_len}], got {lengths.tolist()}")
        return lengths

    def _fill_row(self, b: int, k: Tensor, v: Tensor, u: Tensor) -> Tensor:
        """Row b from its n real tokens k, v [n, H, D], u [n, H] -> its candidate scores [H, n - w] (float64)."""
        n, w = k.shape[0], self.window
        n_win = min(w, n)
        if n_win:
            pos = torch.arange(n - n_win, n, device=k.device)
            self._write(b, pos % w, k[n - n_win:], v[n - n_win:], u[n - n_win:], pos)
        n_cand = max(0, n - w)
        if not (self.topk and n_cand):
            return u.new_empty(u.shape[1], 0, dtype=torch.float64)
        # The last query's selection: its candidates' top-k under the selection rule's one total order.
        _, by_rank = best_first_order(u[:n_cand].detach().to(self.scores.dtype).T)      # [H, n - w]
        picked = by_rank[:, : min(self.topk, n_cand)].sort(dim=-1).values              # [H, s] positions
        heads = torch.arange(k.shape[1], device=k.device)[:, None]
        slots = w + torch.arange(picked.shape[1], device=k.device)
        self.keys[b, heads, slots] = k[picked, heads]
        self.values[b, heads, slots] = v[picked, heads]
        self.scores[b, heads, slots] = u[picked, heads].to(self.scores.dtype)
        self.positions[b, heads, slots] = picked
        return u[:n_cand].T.double()

    def _write(self, b: int, entries: Tensor, k: Tensor, v: Tensor, u: Tensor, pos: Tensor) -> None:
        """Row b's entries [n] take tokens k, v [n, H, D], u [n, H] at positions pos [n] (all heads)."""
        self.keys[b, :, entries] = k.transpose(0, 1)
        self.values[b, :, entries] = v.transpose(0, 1)
        self.scores[b, :, entries] = u.T.to(self.scores.dtype)
        self.positions[b, :, entries] = pos

    def check_token(self, k: Tensor, v: Tensor, scores: Tensor, q: Tensor | None = None) -> None:
        """ValueError unless k, v [B, H, D] (and q [B, Hq, D]) match the cache's shapes, dtype and device, and
        scores [B, H] are finite floats. Checking finiteness waits for the device, so it runs for CPU tensors
        only, as in `sparsek_attention` (on CUDA a non-finite score gives NaN outputs for its row)."""
        batch, heads, head_dim = self.keys.shape[0], self.keys.shape[1], self.keys.shape[3]
        tensors = (("k", k), ("v", v), ("scores", scores)) + ((("q", q),) if q is not None else ())
        for name, x in tensors:
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if (k.shape != (batch, heads, head_dim) or v.shape != k.shape or scores.shape != (batch, heads)
                or q is not None and (q.dim() != 3 or q.shape[0] != batch or q.shape[1] % heads
                                      or q.shape[2] != head_dim)):
            raise ValueError(f"cache of B={batch}, H={heads}, D={head_dim} needs q [B, Hq, D] (Hq a multiple of "
                             f"H), k, v [B, H, D], scores [B, H]; got {tuple(getattr(q, 'shape', ()))}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(scores.shape)}")
        for name, x in tensors:
            if name != "scores" and x.dtype != self.keys.dtype:
                raise ValueError(f"{name} must be {self.keys.dtype} like the cache, got {x.dtype}")
            if x.device != self.keys.device:
                raise ValueError(f"{name} must be on the cache's device {self.keys.device}, got {x.device}")
        if not scores.is_floating_point():
            raise ValueError(f"scores must be floating point, got {scores.dtype}")
        if scores.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.isfinite(scores).all():
            b, h = (~torch.isfinite(scores)).nonzero()[0].tolist()
            raise ValueError(f"scores contain NaN or inf: scores[{b}, {h}] = {scores[b, h].item()} (a NaN is never "
                             "selected yet would move tau for the other keys)")

    def append(self, k: Tensor, v: Tensor, scores: Tensor) -> None:
        """One new token per row: k, v [B, H, D], scores [B, H] (checked by `check_token` first)."""
        self.check_token(k, v, scores)
        self._append(k, v, scores)

    def _append(self, k: Tensor, v: Tensor, scores: Tensor) -> None:
        """`append` on checked inputs, in PyTorch (`ops.decode.cache_step` is its fused twin)."""
        rows = torch.arange(self.batch, device=k.device)
        t, w = self.lengths, self.window
        if w:
            ring = t % w                                       # the token at t - w, if any, leaves from here
            leaving = [x[rows, :, ring] for x in (self.keys, self.values, self.scores)]
            self._admit(*leaving, t - w, (t >= w)[:, None])
            self.keys[rows, :, ring], self.values[rows, :, ring] = k, v
            self.scores[rows, :, ring] = scores.to(self.scores.dtype)
            self.positions[rows, :, ring] = t[:, None]
        else:                                                  # no window: the new token is a candidate at once
            self._admit(k, v, scores.to(self.scores.dtype), t, torch.ones_like(t, dtype=torch.bool)[:, None])
        self.lengths += 1                                      # in place: a captured graph keeps its address

    def _admit(self, k: Tensor, v: Tensor, u: Tensor, position: Tensor, present: Tensor) -> None:
        """Candidates k, v [B, H, D], u [B, H] (in the cache's score dtype) at position [B] (where present
        [B, 1]): keep the score if it beats the buffer's lowest, and give the key a slot if it makes the top-k."""
        if self.topk == 0:                                     # window only: no threshold, nothing to keep
            return
        u_kept = torch.where(present, u.double(), -torch.inf)[..., None]                 # [B, H, 1]
        lowest, column = self.kept_u.min(dim=-1, keepdim=True)                          # the first lowest
        enters = u_kept > lowest
        self.kept_u.scatter_(-1, column, torch.where(enters, u_kept, lowest))
        torch.maximum(self.dropped_u, torch.where(enters, lowest, u_kept)[..., 0], out=self.dropped_u)

        slot_u, slot_pos = self.scores[..., self.window:], self.positions[..., self.window:]
        # Worst selected key: lowest score, ties to the older one (which the newer candidate then beats).
        # Empty slots come first: while the slots fill, the (j + 1)-th candidate takes slot j.
        filling = (position < self.topk)[:, None]
        live_u = torch.where(slot_pos >= 0, slot_u, -torch.inf)
        worst_u = live_u.min(dim=-1).values
        tied = live_u == worst_u[..., None]
        worst = torch.where(tied, slot_pos, torch.iinfo(torch.int64).max).argmin(-1)
        slot = torch.where(filling, position.clamp(0, self.topk - 1)[:, None], worst)
        take = present & (filling | (u >= worst_u))
        entry = (self.window + slot)[..., None]                                        # [B, H, 1]
        d_entry = entry[..., None].expand(-1, -1, -1, k.shape[-1])                     # [B, H, 1, D]
        keep = take[..., None]
        self.positions.scatter_(-1, entry, torch.where(keep, position[:, None, None], self.positions.gather(-1, entry)))
        self.scores.scatter_(-1, entry, torch.where(keep, u[..., None], self.scores.gather(-1, entry)))
        self.keys.scatter_(2, d_entry, torch.where(keep[..., None], k[..., None, :], self.keys.gather(2, d_entry)))
        self.values.scatter_(2, d_entry, torch.where(keep[..., None], v[..., None, :],
                                                     self.values.gather(2, d_entry)))

    def threshold(self) -> Tensor:
        """tau [B, H] (float64) of each row's candidates; -inf while at most k of them exist (all weigh 1)."""
        n_cand = (self.lengths - self.window).clamp(min=0)[:, None]
        if self.topk == 0:
            return torch.full(self.kept_u.shape[:2], -torch.inf, dtype=torch.float64, device=self.keys.device)
        if self.kept_u.is_cuda:  # one kernel instead of ~100 small launches (sorts, searches) per step
            tau = kept_threshold(self.kept_u, self.topk)
        else:
            tau = kept_threshold_reference(self.kept_u, self.topk)
        return torch.where(n_cand > self.topk, tau, -torch.inf)

    def exact(self) -> Tensor:
        """[B, H] bool: tau is at or above every score the max_kept bound dropped, so tau, the weights and the
        outputs are those of an unbounded cache (and of the parallel forward)."""
        return self.threshold() >= self.dropped_u

    def weights(self) -> tuple[Tensor, Tensor]:
        """The mask m [B, H, N] (1 in the window, clip(u - tau, 0, 1) in the slots; float32, float64 for a
        float64 cache) and which entries hold a token [B, H, N] (bool)."""
        dtype = torch.float64 if self.keys.dtype == torch.float64 else torch.float32
        tau = self.threshold()[..., None]
        # tau = -inf: at most k candidates, all weigh 1 (also a slot whose score is -inf, which -inf - -inf is not)
        gap = torch.where(tau > -torch.inf, (self.scores[..., self.window:].double() - tau).clamp(0, 1), 1.0)
        gap = gap.to(dtype)
        weight = torch.cat([torch.ones_like(self.scores[..., :self.window], dtype=dtype), gap], dim=-1)
        return weight, self.positions >= 0

    @torch.no_grad()
    def step(self, q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, gate: str = "kv",
             scale: float | None = None, backend: str = "auto") -> Tensor:
        """Decode one token per row: q [B, Hq, D], k, v [B, H, D], scores [B, H] -> output [B, Hq, D].

        backend "triton" runs the fused step (`ops.decode.cache_step`: one kernel updates the cache and writes
        the mask, one attends); "reference" runs PyTorch; "auto" the first for supported CUDA tensors. The
        inputs, options and backend are checked before the cache changes, so a refused step leaves no trace (a
        failure after that, such as a kernel running out of memory, leaves the token appended). Non-finite
        scores raise ValueError for CPU tensors. Where they are not checked on the host (CUDA, which would have
        to wait for the GPU, and compiled code), such a score makes its row's output NaN for this step, and the
        token enters the cache with score -inf (the lowest: it weighs 0 once its row has more than topk
        candidates), on both paths alike.
        """
        self.check_token(k, v, scores, q)
        check_gate(gate)
        check_scale(scale)
        check_backend(backend)
        fused = kernel_for(backend, decode_fused, "cache_step", q)
        if fused is not None:                            # the kernels treat non-finite scores themselves
            weight, attended, nonfinite = fused(self, k, v, scores)
            return decode_fused.decode_attention_triton(q, self.keys, self.values, weight, attended, gate=gate,
                                                        scale=scale, nonfinite=nonfinite)
        unchecked = scores.device.type != "cpu" or torch.compiler.is_compiling()
        if unchecked:
            finite = torch.isfinite(scores)
            scores = torch.where(finite, scores, -torch.inf)
        self._append(k, v, scores)
        weight, attended = self.weights()
        out = decode_attention_reference(q, self.keys, self.values, weight, attended, gate=gate, scale=scale)
        if unchecked:
            out = out.masked_fill(~finite.all(-1)[:, None, None], torch.nan)
        return out
