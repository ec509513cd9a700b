"""CUDA-graph replay for short, launch-bound sequences of kernels (the selection before and after attention).

At a few thousand tokens the selection is a few dozen small launches whose CPU cost exceeds their GPU time;
a captured graph replays them in one launch. Shapes are static per call, so graphs are cached by the shapes
and scalar arguments; each cached graph keeps its intermediate buffers alive, hence the size limit and the
small LRU. Set SPARSEK_CUDA_GRAPHS=0 to turn this off.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor


class GraphedFunction:
    """Calls fn(*tensors, *scalars) through a cached CUDA graph when the inputs are on CUDA and small enough.

    fn must be capturable (no host synchronisation) and return a tuple of tensors; the results are copies,
    safe to keep.
    """

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], max_elements: int, max_entries: int = 4):
        self.fn = fn
        self.max_elements = max_elements
        self.max_entries = max_entries
        self.cache: OrderedDict = OrderedDict()

    def __call__(self, tensors: tuple[Tensor, ...], scalars: tuple) -> tuple[Tensor, ...]:
        if not self._usable(tensors):
            return self.fn(*tensors, *scalars)
        key = (tuple((t.shape, t.dtype, t.device) for t in tensors), scalars)
        entry = self.cache.get(key)
        if entry is None:
            entry = self._capture(tensors, scalars)
            self.cache[key] = entry
            if len(self.cache) > self.max_entries:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        graph, static_in, static_out = entry
        for buffer, value in zip(static_in, tensors):
            buffer.copy_(value)
        graph.replay()
        return tuple(out.clone() for out in static_out)

    def _usable(self, tensors: tuple[Tensor, ...]) -> bool:
        return (os.environ.get("SPARSEK_CUDA_GRAPHS", "1") != "0"
                and all(t.is_cuda for t in tensors)
                and max(t.numel() for t in tensors) <= self.max_elements
                and not torch.cuda.is_current_stream_capturing())

    def _capture(self, tensors: tuple[Tensor, ...], scalars: tuple):
        with torch.cuda.device(tensors[0].device):
            return self._capture_here(tensors, scalars)

    def _capture_here(self, tensors: tuple[Tensor, ...], scalars: tuple):
        static_in = tuple(t.clone() for t in tensors)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: compiles kernels, sizes allocations
            self.fn(*static_in, *scalars)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in, *scalars)
        return graph, static_in, static_out
