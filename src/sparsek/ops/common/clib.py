"""Build a C file of this package into a shared library on first use and load it with ctypes; run its calls on
several threads.

The CPU twins (ops/select/native.c, ops/attention/native.c) use no torch headers, so a build takes a second or
two with the system's compiler (`cc`, or $CC). Each build goes once per source, compiler and flags into
$SPARSEK_CACHE (default ~/.cache/sparsek) and is loaded from there. ctypes lets go of the GIL during a call, so
Python threads run C calls in parallel (`in_parts`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def cache_dir() -> Path:
    """Where built libraries go: $SPARSEK_CACHE, else $XDG_CACHE_HOME/sparsek or ~/.cache/sparsek. They are
    loaded from there, so the folder must be writable by its user only."""
    if folder := os.environ.get("SPARSEK_CACHE"):
        return Path(folder)
    if folder := os.environ.get("XDG_CACHE_HOME"):
        return Path(folder) / "sparsek"
    return Path.home() / ".cache" / "sparsek"


@functools.cache
def _cpu() -> str:
    """What a -march=native build depends on: the CPU's model and instruction sets (Linux), else its name. A cache
    folder shared between machines must not hand one CPU's build to another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def build(source: Path, flag_sets: list[list[str]]) -> ctypes.CDLL | str:
    """source built with the first of flag_sets the compiler accepts, loaded; or why it could not be built or
    loaded (the compiler's message). The key of the cached build names the source text, compiler and flags, and
    for -march=native the CPU."""
    if not source.is_file():
        return f"{source} is missing from this install"
    compiler = shlex.split(os.environ.get("CC", "cc"))
    text = source.read_text()
    failure = ""
    for flags in flag_sets:
        cpu = _cpu() if "-march=native" in flags else ""
        key = "\0".join([text, *compiler, *flags, platform.machine(), platform.system(), cpu])
        try:
            target = cache_dir() / f"{source.parent.name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                # Build beside the target and rename: processes building at once never load a half-written file.
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    built = Path(tmp) / target.name
                    subprocess.run([*compiler, *flags, "-o", str(built), str(source)], check=True,
                                   capture_output=True, text=True, timeout=120)
                    os.replace(built, target)
            return ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:   # RuntimeError: no home folder
            detail = getattr(error, "stderr", "") or error
            failure = f"{' '.join(compiler)} could not build or load {source.name}: {detail}".strip()
    return failure


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="sparsek-native")


def in_parts(n_items: int, parts: int, work) -> list:
    """work(first, last) over contiguous parts of range(n_items): `parts` of them, at most
    torch.get_num_threads() and n_items and at least 1, part 0 on this thread. Its results, in part order."""
    parts = max(1, min(torch.get_num_threads(), n_items, parts))
    bounds = [n_items * p // parts for p in range(parts + 1)]
    futures = [_pool(parts).submit(work, bounds[p], bounds[p + 1]) for p in range(1, parts)]
    return [work(bounds[0], bounds[1])] + [f.result() for f in futures]
