"""transformers integration: converted models decode exactly, match the original with topk >= T, save and load."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsek.integrations.hf import SparseKHFCache, cache_argument, convert, load  # noqa: E402

VOCAB = 61


def tiny_model(family: str) -> transformers.PreTrainedModel:
    """A random 2-layer model; head dim 8 keeps the attention on the PyTorch paths (fast on CPU)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if family == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, **common)
    elif family == "qwen2":
        config = transformers.Qwen2Config(num_key_value_heads=1, **common)
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(rotary_pct=0.5, **common)
    else:
        raise ValueError(family)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def converted(family: str, topk: int, window: int, gate: str = "kv") -> transformers.PreTrainedModel:
    """Converted, with random scorer weights so the selection is not plain recency."""
    model = convert(tiny_model(family), topk=topk, window=window, slope=0.05, gate=gate)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparsek_scorer" in name:
                p.normal_(0, 1.0)
    return model


FAMILIES = ["llama", "qwen2", "gpt_neox"]


def logits_step_by_step(model, ids, prompt_len, mask=None):
    """Prefill ids[:, :prompt_len], then feed one token at a time through the SparseK cache."""
    cache = SparseKHFCache()
    mask = torch.ones_like(ids) if mask is None else mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = [model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len], position_ids=positions[:, :prompt_len],
                 **{cache_argument(model): cache}, use_cache=True).logits]
    for t in range(prompt_len, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                         **{cache_argument(model): cache}, use_cache=True).logits)
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [1, 3, 14])
@torch.no_grad()
def test_decoding_equals_parallel_forward(family, prompt_len):
    """Prompts shorter and longer than topk + window = 5; positions after the prompt compared one by one."""
    model = converted(family, topk=3, window=2)
    ids = torch.randint(0, VOCAB, (2, 24))
    want = model(ids, use_cache=False).logits
    got, _ = logits_step_by_step(model, ids, prompt_len)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(family):
    model = converted(family, topk=3, window=2, gate="v")
    lengths, t_len = [20, 13, 4], 20
    ids = torch.randint(0, VOCAB, (3, t_len))
    mask = (torch.arange(t_len) >= t_len - torch.tensor(lengths)[:, None]).long()
    got, _ = logits_step_by_step(model, ids, 17, mask)  # the padding lies inside the prompt
    for row, n in enumerate(lengths):
        alone = model(ids[row:row + 1, t_len - n:], use_cache=False).logits[0]
        torch.testing.assert_close(got[row, t_len - n:], alone, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_topk_beyond_length_equals_original_model(family):
    original = tiny_model(family)
    model = convert(copy.deepcopy(original), topk=64, window=3)
    ids = torch.randint(0, VOCAB, (2, 30))
    torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=2e-5, rtol=2e-5)
    prompt = ids[:, :6]
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    reference = original.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)


@torch.no_grad()
def test_generate_left_padded_batch_and_sampling():
    """Greedy generate over a padded batch gives each row's own continuation; sampling runs too."""
    model = converted("llama", topk=4, window=3)
    rows = [torch.randint(0, VOCAB, (n,)) for n in (11, 5)]
    pad = torch.zeros(6, dtype=torch.long)
    ids = torch.stack([rows[0], torch.cat([pad, rows[1]])])
    mask = torch.stack([torch.ones(11), torch.cat([torch.zeros(6), torch.ones(5)])]).long()
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(rows):
        alone = model.generate(prompt[None], max_new_tokens=15, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[row, 11:], alone[0, len(prompt):])
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=10,
                             num_return_sequences=2, pad_token_id=0)
    assert sampled.shape == (4, 19)


@torch.no_grad()
def test_cache_memory_constant_while_generating():
    """Measured from the cache's tensors at every step up to 4x past topk + window."""
    topk, window = 6, 4
    model = converted("llama", topk=topk, window=window)
    ids = torch.randint(0, VOCAB, (2, 4 * (topk + window) + 7))
    cache = SparseKHFCache()
    sizes = []
    for t in range(ids.shape[1]):
        model(ids[:, t:t + 1], **{cache_argument(model): cache}, use_cache=True)
        sizes.append(cache.kv_bytes())
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 2 * config.num_hidden_layers * 2 * config.num_key_value_heads * (topk + window) * head_dim * 4
    assert sizes == [expected] * len(sizes)


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    model = converted("qwen2", topk=3, window=2, gate="v")
    model.save_pretrained(tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    loaded = load(tmp_path)
    assert loaded.config.sparsek == {"topk": 3, "window": 2, "slope": 0.05, "gate": "v"}
    ids = torch.randint(0, VOCAB, (1, 17))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="no SparseK model"):
        tiny_model("llama").save_pretrained(tmp_path / "plain")
        load(tmp_path / "plain")


@torch.no_grad()
def test_errors_are_clear():
    model = converted("llama", topk=3, window=2)
    with pytest.raises(ValueError, match="already converted"):
        convert(model, topk=3, window=2)
    with pytest.raises(ValueError, match="not both 0"):
        convert(tiny_model("llama"), topk=0, window=0)
    with pytest.raises(ValueError, match="gate"):
        convert(tiny_model("llama"), topk=2, window=2, gate="q")
    ids = torch.randint(0, VOCAB, (2, 8))
    right_padded = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with pytest.raises(ValueError, match="left padding only"):
        model(ids, attention_mask=right_padded)
    plain, cache = tiny_model("llama"), SparseKHFCache()
    plain(ids, **{cache_argument(plain): cache}, use_cache=True)
    with pytest.raises(ValueError, match="converted"):
        plain(ids[:, :1], **{cache_argument(plain): cache}, use_cache=True)
    with pytest.raises(ValueError, match="2D"):
        model(ids, attention_mask=torch.ones(2, 1, 8, 8))          # a prepared 4D mask
    dynamic = transformers.DynamicCache()
    model(ids, **{cache_argument(model): dynamic}, use_cache=True)
    with pytest.raises(ValueError, match="SparseKHFCache"):
        model(ids[:, :1], **{cache_argument(model): dynamic}, use_cache=True)


def gpu_model(topk: int, window: int) -> transformers.PreTrainedModel:
    """A converted float32 Llama on the GPU with head dim 64, so prefill and decode both run Triton kernels."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = convert(transformers.LlamaForCausalLM(config).cuda().eval(), topk=topk, window=window, slope=0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparsek_scorer" in name:
                p.normal_(0, 1.0)
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_gpu_kernels_decode_equal_parallel():
    """On the GPU both paths run Triton (fused prefill, decode kernel): float32 logits agree step by step."""
    model = gpu_model(topk=16, window=8)
    ids = torch.randint(0, VOCAB, (3, 90), device="cuda")
    want = model(ids, use_cache=False).logits
    got, _ = logits_step_by_step(model, ids, 40)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_graphed_decoder_equals_eager_steps():
    """Left-padded prompts, then 30 tokens replayed from a CUDA graph: the logits of eager decoding."""
    from sparsek.integrations.hf import GraphedDecoder

    model = gpu_model(topk=8, window=4)
    ids = torch.randint(0, VOCAB, (2, 50), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :7] = 0                                                    # row 1: 7 tokens of left padding
    want, _ = logits_step_by_step(model, ids, 20, mask)
    cache = SparseKHFCache()
    model(ids[:, :20], attention_mask=mask[:, :20], **{cache_argument(model): cache})   # transformers' own position ids
    decoder = GraphedDecoder(model, cache, steps=30)
    got = torch.stack([decoder(ids[:, t:t + 1]) for t in range(20, 50)], dim=1)
    torch.testing.assert_close(got, want[:, 20:], atol=1e-3, rtol=1e-3)
    with pytest.raises(RuntimeError, match="reserved steps"):
        decoder(ids[:, :1])


@torch.no_grad()
def test_beam_search_reorders_the_cache():
    """Beams reorder cache rows (select_rows): the same beams with the SparseK cache as without any cache."""
    model = converted("llama", topk=3, window=2)
    prompt = torch.randint(0, VOCAB, (2, 6))
    options = dict(max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **options)
    uncached = model.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached, uncached)
