"""Constant-memory KV cache of one SparseK attention layer, and exact token-by-token decoding.

Shape legend: B batch, H KV heads, Hq query heads (G = Hq // H per KV head), D head dim, k = topk slots,
w = window, N = w + k cache entries, M scalar scores kept for the threshold.

Per batch row and KV head the cache holds (SPEC section 4), in one buffer of N entries:
  * entries [0, w): the window, a ring of the w newest keys and values (token p sits at p % w);
  * entries [w, w + k): the selection, k slots holding the top-k of all older tokens (the candidates);
  * the candidate scores that can still move the threshold: a key leaves the top-k for good, and tau never
    falls below min(theta - 1, u_(k+1)) (theta the k-th best score, u_(k+1) the next), so scores below that
    bound are dropped. They are scalars; the KV memory is N pairs whatever the context length. Scores bunched
    within 1 of theta all stay above that bound, so at most `max_kept` are kept (see `SparseKCache`).
Decoding one token: it enters the window; the token leaving the window becomes a candidate and, if it beats
the worst selected key (ties go to the newer key), takes its slot; tau is the SPARSEK threshold of the kept
scores; the query attends to the window (m = 1) and the slots (m = clip(u - tau, 0, 1)), as in the parallel
forward. Rows may hold different numbers of tokens (prompts of different lengths, left padded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .ops.common import check_budget
from .ops.decode import decode_attention
from .ops.select import best_first_order
from .ops.sparsek import kept_threshold, sparsek_threshold

# Default bound on the kept scores, per slot: max_kept = KEPT_PER_SLOT * (topk + 1).
KEPT_PER_SLOT = 8


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

    max_kept bounds the kept candidate scores per (row, KV head): "auto" (default) is 8 (topk + 1), an int must
    be >= topk + 1, None keeps every score that can still move tau (always exact, but with scores bunched within
    1 of the k-th best that is about sqrt(2 k n) of n candidates, growing with the context). With the bound the
    kept-score buffer holds at most max(2 max_kept, 4 (topk + 1)) float64 per (row, KV head) (more only while
    `reserve(steps)` holds room for steps more), so `nbytes()` stays constant in the context like `kv_bytes()`.

    Past the bound the cache keeps the max_kept best scores and remembers, per (row, KV head), the best one it
    dropped (`dropped_u`). What stays exact:
      * the selection (which keys sit in the slots, and their KV) never depends on the kept scores: gate "none"
        decodes like the parallel forward whatever max_kept;
      * tau, the weights m = clip(u - tau, 0, 1) and the outputs, at every step where tau >= every dropped score
        (`exact()`): then the dropped scores would weigh 0, and results equal the unbounded cache's (and the
        parallel forward's) up to rounding (about 1e-16: the sums run over fewer entries). That holds whenever
        at most max_kept candidates lie above tau each time the bound cuts (tau never falls). With the scorer's
        recency slope (0.01 per position, plus uniform [0, 1) noise) the most candidates above tau in 600
        steps were 12, 40 and 122 for k = 1, 8, 64: under 8 (k + 1), and decoding matched the unbounded cache
        at each of 1200 steps;
      * otherwise, more than max_kept candidates above tau (scores stationary within 1 of each other), tau comes
        out lower than the exact one, never higher, so the slot weights m are larger. Measured with scores
        uniform in [0, 1), topk 8, window 4, D 16, 3000 steps: the unbounded cache keeps all 2996 candidates
        (231 above tau, about sqrt(2 k n)), nbytes() 36 KB; max_kept 72 (the default): 4.4 KB, matching it
        for the first 348 steps, then tau falls behind by up to 0.051 (tending to k / max_kept) and "kv"
        outputs differ by up to 0.035; max_kept 144: 5.6 KB, exact for 1268 steps, then up to 0.0076 and 0.0046.
    """

    # All its tensors; every one but the write counter (last) is per batch row.
    _STATE = ("keys", "values", "scores", "positions", "kept_u", "dropped_u", "lengths", "next_column")

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, topk: int, window: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", score_dtype: torch.dtype = torch.float32,
                 max_kept: int | str | None = "auto"):
        check_budget(topk, window)
        if max_kept == "auto":
            max_kept = KEPT_PER_SLOT * (topk + 1)
        if max_kept is not None and (isinstance(max_kept, bool) or not isinstance(max_kept, int)
                                     or max_kept < topk + 1):
            raise ValueError(f"max_kept must be 'auto', None or an int >= topk + 1 = {topk + 1}, got {max_kept!r}")
        self.topk, self.window, self.max_kept = topk, window, max_kept
        shape = (batch, n_kv_heads, window + topk)
        self.keys = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        # Scores in float32, or float64 when the scores are (the parallel path selects in their precision).
        self.scores = torch.zeros(shape, dtype=score_dtype, device=device)
        self.positions = torch.full(shape, -1, dtype=torch.int64, device=device)      # -1: empty entry
        # Kept candidate scores: a fixed-capacity buffer padded with -inf; new ones go to column next_column (a
        # device counter, so a decode step holds no host state and can be captured in a CUDA graph).
        self.kept_u = torch.full((batch, n_kv_heads, 4 * (topk + 1) if topk else 0), -torch.inf,
                                 dtype=torch.float64, device=device)
        # Best score the max_kept bound dropped (-inf: none): tau at or above it means tau is exact.
        self.dropped_u = torch.full((batch, n_kv_heads), -torch.inf, dtype=torch.float64, device=device)
        self.next_column = torch.zeros(1, dtype=torch.int64, device=device)
        self.n_kept = 0                                                                # host mirror
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)            # tokens seen per row

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def kv_bytes(self) -> int:
        """Bytes of cached keys and values (the part that scales with head_dim): constant in the context."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (the kept scalar scores included: bounded by max_kept)."""
        return sum(getattr(self, name).nbytes for name in self._STATE)

    def copy_(self, other: SparseKCache) -> None:
        """Take the state of a cache of the same shapes, in place (tensor addresses kept: CUDA-graph safe)."""
        for name in self._STATE:
            getattr(self, name).copy_(getattr(other, name))
        self.n_kept = other.n_kept

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
        for name in self._STATE[:-1]:
            setattr(self, name, getattr(self, name).index_select(0, index))

    @classmethod
    def prefill(cls, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int,
                lengths: Tensor | None = None, max_kept: int | str | None = "auto") -> SparseKCache:
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
        kept = []
        for b, n in enumerate(lengths.tolist()):  # once per prompt: a loop over rows keeps the indexing plain
            kept.append(cache._fill_row(b, k[b, t_len - n:], v[b, t_len - n:], scores[b, t_len - n:]))
        cache.lengths = lengths.to(k.device, copy=True)  # updated in place while decoding
        if topk:
            width = max(row.shape[-1] for row in kept)
            cache.set_kept(torch.stack([torch.nn.functional.pad(row, (0, width - row.shape[-1]), value=-torch.inf)
                                         for row in kept]))
            cache._prune()
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

    def set_kept(self, kept: Tensor, room: int = 0) -> None:
        """kept [B, H, n] (-inf pads) becomes the kept scores, in a buffer with room for `room` more at least."""
        n = kept.shape[-1]
        # Twice what is kept: pruning costs O(n log n) once per n steps. Not the old capacity: after a long
        # prompt that would hold its width for good.
        capacity = max(4 * (self.topk + 1), 2 * n, n + room)
        self.kept_u = torch.nn.functional.pad(kept, (0, capacity - n), value=-torch.inf)
        self.n_kept = n
        self.next_column.fill_(n)

    def _prune(self) -> None:
        """Drop candidate scores below min(theta - 1, u_(k+1)): no later threshold can depend on them. Then keep
        the max_kept best, recording the best score that cut drops (in dropped_u)."""
        if self.n_kept <= self.topk + 1:
            return
        ranked = torch.sort(self.kept_u[..., :self.n_kept], dim=-1, descending=True).values
        bound = torch.minimum(ranked[..., self.topk - 1] - 1, ranked[..., self.topk])
        ranked = torch.where(ranked >= bound[..., None], ranked, -torch.inf)
        width = max(self.topk + 1, int((ranked > -torch.inf).sum(-1).max()))       # waits for the GPU
        if self.max_kept is not None and width > self.max_kept:
            # Bunched scores: this cut may drop live scores. tau stays exact while it is at or above all of them
            # (see `exact`); rows are sorted, so the best dropped is the first past the cut (-inf if it was dead).
            torch.maximum(self.dropped_u, ranked[..., self.max_kept], out=self.dropped_u)
            width = self.max_kept
        self.set_kept(ranked[..., :width])

    def reserve(self, steps: int) -> None:
        """Make room for `steps` more tokens: until then `append` and `step` do no host work (no pruning, no
        reallocation, no synchronisation), so a decode step can be captured in a CUDA graph and replayed."""
        if self.topk and self.n_kept + steps > self.kept_u.shape[-1]:
            self._prune()
            if self.n_kept + steps > self.kept_u.shape[-1]:
                self.set_kept(self.kept_u[..., :self.n_kept], room=steps)

    def replayed(self, steps: int = 1) -> None:
        """Bring the host mirror up to date after `steps` decode steps replayed from a CUDA graph (within what
        `reserve` made room for): the device tensors advanced, the host count of kept scores did not."""
        if self.topk:
            self.n_kept += steps

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

    def _append(self, k: Tensor, v: Tensor, scores: Tensor) -> Callable[[], None]:
        """`append` on checked inputs; returns the function that undoes it (so that `step` is all-or-nothing)."""
        rows = torch.arange(self.batch, device=k.device)
        t, w = self.lengths, self.window
        if w:
            ring = t % w                                       # the token at t - w, if any, leaves from here
            leaving = (t >= w)[:, None]
            old = [x[rows, :, ring] for x in (self.keys, self.values, self.scores, self.positions)]
            undo_admit = self._admit(*old[:3], t - w, leaving)
            self.keys[rows, :, ring], self.values[rows, :, ring] = k, v
            self.scores[rows, :, ring] = scores.to(self.scores.dtype)
            self.positions[rows, :, ring] = t[:, None]
        else:                                                  # no window: the new token is a candidate at once
            undo_admit = self._admit(k, v, scores, t, torch.ones_like(t, dtype=torch.bool)[:, None])
        self.lengths += 1                                      # in place: a captured graph keeps its address

        def undo() -> None:
            self.lengths -= 1
            if w:
                for x, x_old in zip((self.keys, self.values, self.scores, self.positions), old):
                    x[rows, :, ring] = x_old
            undo_admit()
        return undo

    def _admit(self, k: Tensor, v: Tensor, u: Tensor, position: Tensor, present: Tensor) -> Callable[[], None]:
        """Candidates k, v [B, H, D], u [B, H] at position [B] (where present [B, 1]): keep the score, and
        give the key a slot if it makes the top-k. Returns the function that undoes it."""
        if self.topk == 0:                                     # window only: no threshold, nothing to keep
            return lambda: None
        if self.n_kept == self.kept_u.shape[-1]:               # full: prune (rare: the buffer holds 4(k + 1))
            self.reserve(1)
        column = self.next_column.view(1, 1, 1).expand(*u.shape, 1)
        self.kept_u.scatter_(-1, column, torch.where(present, u.double(), -torch.inf)[..., None])
        self.next_column += 1
        self.n_kept += 1
        slot_u, slot_pos = self.scores[..., self.window:], self.positions[..., self.window:]
        # Worst selected key: lowest score, ties to the older one (which the newer candidate then beats).
        # Empty slots come first: while the slots fill, the (j + 1)-th candidate takes slot j.
        filling = (position < self.topk)[:, None]
        live_u = torch.where(slot_pos >= 0, slot_u, -torch.inf)
        worst_u = live_u.min(dim=-1).values
        tied = live_u == worst_u[..., None]
        worst = torch.where(tied, slot_pos, torch.iinfo(torch.int64).max).argmin(-1)
        slot = torch.where(filling, position.clamp(0, self.topk - 1)[:, None], worst)
        take = present & (filling | (u.to(worst_u.dtype) >= worst_u))
        entry = (self.window + slot)[..., None]                                        # [B, H, 1]
        d_entry = entry[..., None].expand(-1, -1, -1, k.shape[-1])                     # [B, H, 1, D]
        old = (self.positions.gather(-1, entry), self.scores.gather(-1, entry), self.keys.gather(2, d_entry),
               self.values.gather(2, d_entry))
        keep = take[..., None]
        self.positions.scatter_(-1, entry, torch.where(keep, position[:, None, None], old[0]))
        self.scores.scatter_(-1, entry, torch.where(keep, u.to(self.scores.dtype)[..., None], old[1]))
        self.keys.scatter_(2, d_entry, torch.where(keep[..., None], k[..., None, :], old[2]))
        self.values.scatter_(2, d_entry, torch.where(keep[..., None], v[..., None, :], old[3]))

        def undo() -> None:
            for x, x_old, index, dim in zip((self.positions, self.scores, self.keys, self.values), old,
                                            (entry, entry, d_entry, d_entry), (-1, -1, 2, 2)):
                x.scatter_(dim, index, x_old)
            self.next_column -= 1
            self.n_kept -= 1
            self.kept_u.scatter_(-1, self.next_column.view(1, 1, 1).expand(*u.shape, 1), -torch.inf)
        return undo

    def threshold(self) -> Tensor:
        """tau [B, H] (float64) of each row's candidates; -inf while at most k of them exist (all weigh 1)."""
        n_cand = (self.lengths - self.window).clamp(min=0)[:, None]
        if self.topk == 0:
            return torch.full(self.kept_u.shape[:2], -torch.inf, dtype=torch.float64, device=self.keys.device)
        if self.kept_u.is_cuda:  # one kernel instead of ~100 small launches (sorts, searches) per step
            tau = kept_threshold(self.kept_u, self.topk)
        else:
            tau = sparsek_threshold(self.kept_u, self.topk)
        return torch.where(n_cand > self.topk, tau, -torch.inf)

    def exact(self) -> Tensor:
        """[B, H] bool: tau is at or above every score the max_kept bound dropped, so tau, the weights and the
        outputs are those of an unbounded cache (and of the parallel forward). Always true for max_kept=None."""
        return self.threshold() >= self.dropped_u

    def weights(self) -> tuple[Tensor, Tensor]:
        """The mask m [B, H, N] (1 in the window, clip(u - tau, 0, 1) in the slots; float32, float64 for a
        float64 cache) and which entries hold a token [B, H, N] (bool)."""
        dtype = torch.float64 if self.keys.dtype == torch.float64 else torch.float32
        gap = (self.scores[..., self.window:].double() - self.threshold()[..., None]).clamp(0, 1).to(dtype)
        weight = torch.cat([torch.ones_like(self.scores[..., :self.window], dtype=dtype), gap], dim=-1)
        return weight, self.positions >= 0

    @torch.no_grad()
    def step(self, q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, gate: str = "kv",
             scale: float | None = None, backend: str = "auto") -> Tensor:
        """Decode one token per row: q [B, Hq, D], k, v [B, H, D], scores [B, H] -> output [B, Hq, D].

        All or nothing: inputs are checked (`check_token`) before the cache changes, and any error after that
        (gate, scale, backend, the kernel) undoes the append, so a retry does not add the token twice.
        Non-finite scores raise ValueError for CPU tensors; on CUDA their rows' outputs are NaN instead.
        """
        self.check_token(k, v, scores, q)
        undo = self._append(k, v, scores)
        try:
            weight, attended = self.weights()
            out = decode_attention(q, self.keys, self.values, weight, attended, gate=gate, scale=scale,
                                   backend=backend)
        except BaseException:
            undo()
            raise
        if scores.is_cuda:  # not checked on the host (that would wait for the GPU): poison the row instead
            out = out.masked_fill(~torch.isfinite(scores).all(-1)[:, None, None], torch.nan)
        return out
