"""Build a C file of this package into a shared library on first use and load it with ctypes.

The CPU twins (ops/select/native.c, ops/attention/native.c) use no torch headers, so a build takes a second or
two with the system's compiler (`cc`, or $CC). Each build goes once per source, compiler and flags into
$SPARSEK_CACHE (default ~/.cache/sparsek) and is loaded from there. The files split their work between threads
with OpenMP where the compiler has it (-fopenmp: the libgomp torch already loaded, so torch's thread pool).
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
from pathlib import Path


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


def build(source: Path, flag_sets: list[list[str]], also: tuple[Path, ...] = ()) -> ctypes.CDLL | str:
    """source (with the C files `also`, linked into the same library) built with the first of flag_sets the
    compiler accepts, loaded; or why it could not be built or loaded (the compiler's message). The key of the
    cached build names the sources' text, compiler and flags, and for -march=native the CPU."""
    sources = (source, *also)
    for path in sources:
        if not path.is_file():
            return f"{path} is missing from this install"
    compiler = shlex.split(os.environ.get("CC", "cc"))
    text = "\0".join(path.read_text() for path in sources)
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
                    subprocess.run([*compiler, *flags, "-o", str(built), *map(str, sources)], check=True,
                                   capture_output=True, text=True, timeout=120)
                    os.replace(built, target)
            return ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:   # RuntimeError: no home folder
            detail = getattr(error, "stderr", "") or error
            failure = f"{' '.join(compiler)} could not build or load {source.name}: {detail}".strip()
    return failure
