"""Shared pytest configuration for the sparsek CPU test suite."""

import os
import random

import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter (SPEC section 6). This must
# happen before sparsek's kernels are imported: triton.jit reads it when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Small shapes everywhere: more threads only add overhead (and CI has 2 cores).
torch.set_num_threads(min(2, os.cpu_count() or 1))

for profile, examples in (("default", 40), ("thorough", 400)):
    settings.register_profile(
        profile,
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
settings.load_profile(os.environ.get("SPARSEK_HYPOTHESIS_PROFILE", "default"))

HAS_CUDA = torch.cuda.is_available()

#: Skip marker for tests that need a CUDA device: ``@requires_cuda``.
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: test needs a CUDA device (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A numpy Generator with a fixed seed (each test gets a fresh one)."""
    import numpy as np

    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Deterministic torch RNG in every test."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Six small documents of pseudo-words (each a few kB, so windows of 32-64 bytes fit many times)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(40)]
    for n in range(6):
        text = " ".join(rng.choice(words) for _ in range(600))
        (folder / f"doc{n}.txt").write_text(f"Document {n}.\n{text}\n")
    return folder


def tiny_transformers_model(folder):
    """A random 2-layer Llama over bytes saved with its tokenizer in folder/tiny_llama (no download needed)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    path = folder / "tiny_llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    vocab = {bytes([b]).decode("latin-1"): b for b in range(256)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="\x00"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)
    return path


#: How `damage_file` damages a file: what a stopped copy, a wrong download or a full disk leaves.
DAMAGES = ("truncated", "garbage", "empty")


def damage_file(path, how: str) -> None:
    """Cut the file in half, replace it with text, or empty it (how: one of DAMAGES)."""
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"<html>404 Not Found</html>\n" * 8,
                      "empty": b""}[how])
