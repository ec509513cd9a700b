import random

import pytest


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
