"""Wavelet-matrix levels over batched integer rows, built and walked one level at a time.

A wavelet matrix stores a sequence of integers in [0, 2**nbits) as nbits bit planes. At each level (most
significant bit first) the sequence is stably partitioned by that bit, zeros first; a position range [lo, hi)
of the sequence at one level maps to one range of the next level on the zero side and one on the one side.
That answers "how many / what sum of the values in positions [lo, hi) have this bit prefix" in O(1) per level
from prefix counts, so a query that descends the bits costs O(nbits) and all N queries of a row cost
O(N log N) together, with plain gathers and cumsums that vectorise over rows and queries.

Queries only ever use one level at a time, top to bottom, so levels are produced lazily and never stored:
memory stays O(R * N).

Shapes: R rows (batch x heads), N values per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Level:
    zeros_before: Tensor          # [R, N + 1] int64: zeros among the first x entries of this level
    n_zeros: Tensor               # [R, 1] int64: all zeros of this level
    ones_weight_before: Tensor | None  # [R, N + 1]: sum of weights of the ones among the first x entries

    def count(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Zeros before lo, zeros before hi, and ones inside [lo, hi). lo, hi: [R, Q] int64."""
        z_lo, z_hi = self.zeros_before.gather(1, lo), self.zeros_before.gather(1, hi)
        return z_lo, z_hi, (hi - lo) - (z_hi - z_lo)

    def ones_weight(self, lo: Tensor, hi: Tensor) -> Tensor:
        return self.ones_weight_before.gather(1, hi) - self.ones_weight_before.gather(1, lo)

    def to_ones(self, lo: Tensor, hi: Tensor, z_lo: Tensor, z_hi: Tensor) -> tuple[Tensor, Tensor]:
        """The range [lo, hi) of this level seen on the next level's ones side (its zeros side is z_lo, z_hi)."""
        return self.n_zeros + lo - z_lo, self.n_zeros + hi - z_hi


def bits_needed(size: int) -> int:
    """Bits to write every integer in [0, size)."""
    return max(1, (size - 1).bit_length())


def wavelet_levels(values: Tensor, nbits: int, weights: Tensor | None = None) -> Iterator[Level]:
    """Yield the nbits levels of the wavelet matrix of `values` [R, N] (ints in [0, 2**nbits)).

    weights [R, N], optional, travel with their values so that each level can sum the weights of its ones.
    """
    n = values.shape[1]
    positions = torch.arange(n, device=values.device).expand_as(values)
    for level in range(nbits):
        bit = (values >> (nbits - 1 - level)) & 1
        zeros_before = torch.nn.functional.pad(torch.cumsum(1 - bit, dim=1), (1, 0))
        n_zeros = zeros_before[:, -1:]
        ones_weight_before = None
        if weights is not None:
            ones_weight_before = torch.nn.functional.pad(torch.cumsum(weights * bit, dim=1), (1, 0))
        yield Level(zeros_before, n_zeros, ones_weight_before)

        # Stable partition by this bit: zeros keep their order at the front, ones after them.
        zeros_here = zeros_before[:, :-1]
        dest = torch.where(bit == 0, zeros_here, n_zeros + positions - zeros_here)
        values = torch.empty_like(values).scatter_(1, dest, values)
        if weights is not None:
            weights = torch.empty_like(weights).scatter_(1, dest, weights)


def kth_smallest_in_prefix(values: Tensor, nbits: int, prefix_len: Tensor, kth: int) -> Tensor:
    """The kth smallest (1-based) of values[r, :prefix_len[r, q]] for every query.

    values: [R, N] ints in [0, 2**nbits); prefix_len: [R, Q] int64. Returns [R, Q] int64, meaningful only
    where prefix_len >= kth. O((N + Q) log N) per row.
    """
    lo = torch.zeros_like(prefix_len)
    hi = prefix_len.clone()
    rank = torch.full_like(prefix_len, kth)
    answer = torch.zeros_like(prefix_len)
    for level in wavelet_levels(values, nbits):
        z_lo, z_hi, _ = level.count(lo, hi)
        zeros = z_hi - z_lo
        go_ones = rank > zeros
        rank = torch.where(go_ones, rank - zeros, rank)
        one_lo, one_hi = level.to_ones(lo, hi, z_lo, z_hi)
        lo = torch.where(go_ones, one_lo, z_lo)
        hi = torch.where(go_ones, one_hi, z_hi)
        answer = 2 * answer + go_ones.long()
    return answer
