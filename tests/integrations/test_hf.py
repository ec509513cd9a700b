"""transformers integration: converted models decode exactly, match the original with topk >= T, save and load."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsek.integrations.hf import (  # noqa: E402
    FullKVLayer,
    GraphedDecoder,
    SparseKHFCache,
    SparseKLayer,
    cache_argument,
    causal_attention,
    convert,
    load,
)
from sparsek.integrations.pretrained import load_pretrained  # noqa: E402

from ..conftest import DAMAGES, damage_file  # noqa: E402

VOCAB = 61


def tiny_model(family: str, n_layers: int = 2) -> transformers.PreTrainedModel:
    """A random model, 2 layers unless told; head dim 8 keeps the attention on the PyTorch paths (fast on CPU)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
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


def converted(family: str, topk: int, window: int, gate: str = "kv", layers=None, n_layers: int = 2,
              sinks: int = 0) -> transformers.PreTrainedModel:
    """Converted, with random scorer weights (sink biases included) so the selection is not plain recency."""
    model = convert(tiny_model(family, n_layers), topk=topk, window=window, slope=0.05, gate=gate, layers=layers,
                    sinks=sinks)
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


@torch.no_grad()
def test_decoding_with_sink_biases_equals_parallel_forward():
    """The sink bias enters through the scores, at the positions the cache is told: decoding stays exact."""
    model = converted("llama", topk=3, window=2, sinks=2)
    for module in model.modules():
        if hasattr(module, "sparsek_scorer"):
            module.sparsek_scorer.sink_bias.data.add_(20.0)     # the first two keys outrank every other
    ids = torch.randint(0, VOCAB, (2, 24))
    want = model(ids, use_cache=False).logits
    got, _ = logits_step_by_step(model, ids, 5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for module in model.modules():
        if hasattr(module, "sparsek_scorer"):
            module.sparsek_scorer.sink_bias.data.zero_()
    assert not torch.allclose(model(ids, use_cache=False).logits, want)


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
    model = converted("qwen2", topk=3, window=2, gate="v", sinks=1)
    model.save_pretrained(tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    loaded = load(tmp_path)
    assert loaded.config.sparsek == {"topk": 3, "window": 2, "slope": 0.05, "gate": "v", "layers": [0, 1],
                                     "sinks": 1}
    ids = torch.randint(0, VOCAB, (1, 17))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # Saved before partial conversion: no "layers" in the settings means every layer.
    config = json.loads((tmp_path / "config.json").read_text())
    del config["sparsek"]["layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load(tmp_path).config.sparsek["layers"] == [0, 1]
    with pytest.raises(ValueError, match="no SparseK model"):
        tiny_model("llama").save_pretrained(tmp_path / "plain")
        load(tmp_path / "plain")


@pytest.mark.parametrize("how", DAMAGES)
def test_load_names_a_damaged_weights_file(tmp_path, how):
    """A saved SparseK model whose model.safetensors is cut short or not safetensors: the error names the file
    (safetensors' own, passed on by from_pretrained, does not), through hf.load and load_pretrained alike."""
    converted("llama", topk=3, window=2).save_pretrained(tmp_path)
    damage_file(tmp_path / "model.safetensors", how)
    for loader in (load, lambda path: load_pretrained(str(path))):
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "model.safetensors"))):
            loader(tmp_path)


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


def compiled_generate(model, ids, mask, backend: str, **config):
    """generate() with a compile_config (transformers compiles the decoding steps when the cache says it can)."""
    compile_config = transformers.CompileConfig(backend=backend, **config)
    compile_config._compile_all_devices = True          # transformers compiles on GPUs only unless told
    return model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          compile_config=compile_config)


@torch.no_grad()
def test_compiled_generate_equals_eager_generate():
    """A fully converted model's cache lets transformers compile the decoding steps: with fullgraph=True (no
    graph break) and a left-padded row, the tokens equal eager generate()'s. A partly converted model's does not
    (its unconverted layers keep growing KV caches)."""
    torch._dynamo.reset()
    model = converted("llama", topk=4, window=3)
    ids = torch.randint(1, VOCAB, (2, 14))
    mask = left_padded([14, 9], 14)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = compiled_generate(model, ids, mask, backend="eager", fullgraph=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames       # it did compile
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert model.generation_cache_factory().is_compileable
    assert not converted("llama", topk=4, window=3, layers=[0]).generation_cache_factory().is_compileable


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_compiled_generate_on_the_gpu():
    """transformers' default compile (inductor, reduce-overhead: CUDA graphs) of the decoding steps, fused
    decode step included: the tokens of eager generate(), with no graph break."""
    torch._dynamo.reset()
    model = gpu_model(topk=8, window=4)
    ids = torch.randint(1, VOCAB, (2, 40), device="cuda")
    mask = left_padded([40, 31], 40).cuda()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = compiled_generate(model, ids, mask, backend="inductor", fullgraph=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_graphed_decoder_equals_eager_steps():
    """Left-padded prompts, then 30 tokens replayed from a CUDA graph: the logits of eager decoding."""
    model = gpu_model(topk=8, window=4)
    ids = torch.randint(0, VOCAB, (2, 50), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :7] = 0                                                    # row 1: 7 tokens of left padding
    want, _ = logits_step_by_step(model, ids, 20, mask)
    cache = SparseKHFCache()
    model(ids[:, :20], attention_mask=mask[:, :20], **{cache_argument(model): cache})   # transformers' own position ids
    decoder = GraphedDecoder(model, cache)
    got = torch.stack([decoder(ids[:, t:t + 1]) for t in range(20, 50)], dim=1)
    torch.testing.assert_close(got, want[:, 20:], atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_beam_search_reorders_the_cache():
    """Beams reorder cache rows (select_rows): the same beams with the SparseK cache as without any cache."""
    model = converted("llama", topk=3, window=2)
    prompt = torch.randint(0, VOCAB, (2, 6))
    options = dict(max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **options)
    uncached = model.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached, uncached)


# Partial conversion: convert(layers=[...]) leaves the other layers exact, with a full KV cache.


def converted_layers(model) -> list[int]:
    return sorted(m.layer_idx for m in model.modules() if hasattr(m, "sparsek_scorer"))


def left_padded(lengths: list[int], t_len: int) -> torch.Tensor:
    return (torch.arange(t_len) >= t_len - torch.tensor(lengths)[:, None]).long()


def float64_original(family: str, n_layers: int = 2) -> transformers.PreTrainedModel:
    """The reference in float64 throughout: eager attention would take its softmax in float32."""
    model = tiny_model(family, n_layers).double()
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [[0], [1], [0, 2]])
@torch.no_grad()
def test_partial_decoding_equals_parallel_forward(family, layers):
    """3 layers, some converted: decoding through SparseKHFCache (SparseK state or full KV, per layer) equals
    the parallel forward, with and without left padding; only the full layers' cache grows."""
    topk, window = 3, 2
    model = converted(family, topk=topk, window=window, layers=layers, n_layers=3)
    assert converted_layers(model) == layers and model.config.sparsek["layers"] == layers
    ids = torch.randint(0, VOCAB, (2, 24))
    got, _ = logits_step_by_step(model, ids, 5)
    torch.testing.assert_close(got, model(ids, use_cache=False).logits, atol=2e-5, rtol=2e-5)

    lengths, t_len = [20, 13, 4], 20
    ids, mask = torch.randint(0, VOCAB, (3, t_len)), left_padded(lengths, t_len)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    got, cache = logits_step_by_step(model, ids, 17, mask)  # the padding lies inside the prompt
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)
    for row, n in enumerate(lengths):
        alone = model(ids[row:row + 1, t_len - n:], use_cache=False).logits[0]
        torch.testing.assert_close(want[row, t_len - n:], alone, atol=2e-5, rtol=2e-5)

    assert [type(layer) for layer in cache.layers] == [SparseKLayer if i in layers else FullKVLayer for i in range(3)]
    assert [cache.get_seq_length(i) for i in range(3)] == [t_len] * 3
    config = model.config
    n_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * 3 * n_kv_heads * (config.hidden_size // config.num_attention_heads) * 4   # k and v, float32
    assert cache.kv_bytes() == per_token * (len(layers) * (topk + window) + (3 - len(layers)) * t_len)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [[0], [1]])
@torch.no_grad()
def test_partial_with_room_for_every_token_equals_original_model(family, layers):
    """With topk + window >= T a converted layer is full attention, so a partially converted model gives the
    original model's logits (float64), without and with left padding."""
    original = float64_original(family)
    model = convert(copy.deepcopy(original), topk=64, window=3, layers=layers)
    ids = torch.randint(0, VOCAB, (3, 30))
    torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-10, rtol=1e-10)
    mask, real = left_padded([30, 21, 9], 30), left_padded([30, 21, 9], 30).bool()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                               original(ids, attention_mask=mask).logits[real], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_unconverted_layers_are_the_original_attention(family):
    """Only layer 2 of 3 converted, and sparse (topk + window < T): the hidden states up to it are the original
    model's (float64, left-padded batch), the last ones are not."""
    original = float64_original(family, n_layers=3)
    model = convert(copy.deepcopy(original), topk=3, window=2, layers=[2])
    ids, mask = torch.randint(0, VOCAB, (3, 30)), left_padded([30, 21, 9], 30)
    real = mask.bool()
    got = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    want = original(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in range(3):
        torch.testing.assert_close(got[layer][real], want[layer][real], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(got[3][real], want[3][real])


@pytest.mark.parametrize("sliding_window", [None, 4])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_causal_attention_equals_explicit_softmax(heads, sliding_window):
    """The unconverted layers' attention against a float64 softmax written out: GQA, scaling, cached keys
    before the queries, left padding, the model's own sliding window; padding queries give zeros."""
    torch.manual_seed(0)
    (n_q_heads, n_kv_heads), batch, kv_len, scaling = heads, 3, 11, 0.3
    mask = left_padded([11, 7, 2], kv_len)
    for t_len in (kv_len, 3, 1):
        q = torch.randn(batch, n_q_heads, t_len, 8, dtype=torch.float64)
        k, v = (torch.randn(batch, n_kv_heads, kv_len, 8, dtype=torch.float64) for _ in range(2))
        q_pos = torch.arange(kv_len - t_len, kv_len)[:, None]
        allowed = torch.arange(kv_len) <= q_pos
        if sliding_window is not None:
            allowed &= torch.arange(kv_len) > q_pos - sliding_window
        allowed = allowed & mask.bool()[:, None, None]                                  # [B, 1, T, S]
        group = n_q_heads // n_kv_heads
        logits = scaling * q @ k.repeat_interleave(group, 1).transpose(-1, -2)
        want = (logits.masked_fill(~allowed, -torch.inf).softmax(-1).nan_to_num() @ v.repeat_interleave(group, 1))
        got = causal_attention(q, k, v, mask, scaling, sliding_window)
        torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-12, rtol=1e-12)
        got = causal_attention(q, k, v, None, scaling, sliding_window)                  # no padding
        want = causal_attention(q, k, v, torch.ones(batch, kv_len + 2), scaling, sliding_window)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@torch.no_grad()
def test_partial_save_and_load_round_trip(tmp_path):
    model = converted("gpt_neox", topk=3, window=2, layers=[1])
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.config.sparsek["layers"] == [1] and converted_layers(loaded) == [1]
    ids = torch.randint(0, VOCAB, (2, 17))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    cached = loaded.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, model.generate(ids[:, :5], max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("layers, message", [
    ([], "empty"), ([2], "indices from 0 to 1"), ([-1], "indices"), ([0, 0], "duplicates"), ([True], "indices"),
    ([0.0], "indices"), ("0", "sequence"), (1, "sequence"),
])
def test_bad_layers_are_refused(layers, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        convert(model, topk=3, window=2, layers=layers)
    # Refused before anything changed: the model converts afterwards.
    assert converted_layers(model) == [] and not hasattr(model.config, "sparsek")
    assert converted_layers(convert(model, topk=3, window=2, layers=[1])) == [1]


@torch.no_grad()
def test_partial_conversion_errors():
    ids = torch.randint(0, VOCAB, (2, 8))
    plain = tiny_model("llama")
    plain.set_attn_implementation("sparsek")                # sparsek attention without convert(): refused
    with pytest.raises(ValueError, match="convert()"):
        plain(ids)
    model = converted("llama", topk=3, window=2, layers=[1])
    with pytest.raises(ValueError, match="already converted"):
        convert(model, topk=3, window=2, layers=[0])
    cache = SparseKHFCache()
    model(ids, **{cache_argument(model): cache}, use_cache=True)
    with pytest.raises(ValueError, match="fully converted"):
        GraphedDecoder(model, cache)
    other = converted("llama", topk=3, window=2, layers=[0])
    with pytest.raises(ValueError, match="another model"):
        other(ids[:, :1], **{cache_argument(other): cache}, use_cache=True)
    dynamic = transformers.DynamicCache()                  # converted layers still need SparseKHFCache to decode
    model(ids, **{cache_argument(model): dynamic}, use_cache=True)
    with pytest.raises(ValueError, match="SparseKHFCache"):
        model(ids[:, :1], **{cache_argument(model): dynamic}, use_cache=True)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_partial_generate_equals_greedy_parallel_decoding(family):
    """generate() on a left-padded batch with a partially converted model (float64): the tokens of greedy
    decoding by the parallel forward, no cache; beam search the same with the cache as without."""
    model = converted(family, topk=3, window=2, layers=[1]).double()
    ids, mask = torch.randint(1, VOCAB, (2, 9)), left_padded([9, 4], 9)
    ids = ids * mask
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ids
    for _ in range(8):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(want, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        want = torch.cat([want, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, want)
    options = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **options), model.generate(ids[:1], use_cache=False, **options))


@torch.no_grad()
def test_partial_cache_batch_operations():
    """Repeating, reordering and selecting rows act on both kinds of cache layer: the next step's logits are
    those of a cache filled from the rearranged batch. reset() empties both kinds."""
    model = converted("qwen2", topk=3, window=2, layers=[1], n_layers=3)
    ids = torch.randint(0, VOCAB, (2, 12))

    def prefilled(batch_ids):
        cache = SparseKHFCache()
        model(batch_ids[:, :-1], **{cache_argument(model): cache}, use_cache=True)
        return cache

    def next_logits(cache, batch_ids):
        return model(batch_ids[:, -1:], **{cache_argument(model): cache}, use_cache=True).logits

    for operation, argument, rows in [("batch_repeat_interleave", 2, [0, 0, 1, 1]),
                                      ("reorder_cache", torch.tensor([1, 0]), [1, 0]),
                                      ("batch_select_indices", torch.tensor([1]), [1])]:
        cache = prefilled(ids)
        getattr(cache, operation)(argument)
        want = next_logits(prefilled(ids[rows]), ids[rows])
        torch.testing.assert_close(next_logits(cache, ids[rows]), want, atol=1e-6, rtol=1e-6)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.kv_bytes() == 0
    want = next_logits(prefilled(ids), ids)
    model(ids[:, :-1], **{cache_argument(model): cache}, use_cache=True)
    torch.testing.assert_close(next_logits(cache, ids), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_autocast_runs_and_stays_close(family):
    """Under bf16 autocast RoPE leaves q and k in float32 while v is bf16 (how a fine-tuning step runs)."""
    model = converted(family, topk=6, window=4)
    ids = torch.randint(0, VOCAB, (2, 30))
    want = model(ids).logits
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device, dtype=torch.bfloat16):
        got = model.to(device)(ids.to(device)).logits.float().cpu()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.1)


# A refused convert changes nothing: checks first, and undoes what it did if a later step fails.


def snapshot(model, ids):
    """What a refused convert must leave as it was: logits, parameters, config, attention, pre-hooks."""
    with torch.no_grad():
        logits = model(ids).logits
    return (logits, {name: p.detach().clone() for name, p in model.named_parameters()}, model.config.to_dict(),
            model.config._attn_implementation, sum(len(m._forward_pre_hooks) for m in model.modules()))


def assert_unchanged(model, before, ids):
    logits, parameters, config, attention, hooks = snapshot(model, ids)
    torch.testing.assert_close(logits, before[0], atol=0, rtol=0)
    assert parameters.keys() == before[1].keys()
    for name, p in parameters.items():
        torch.testing.assert_close(p, before[1][name], atol=0, rtol=0)
    assert (config, attention, hooks) == before[2:]
    assert converted_layers(model) == [] and not hasattr(model.config, "sparsek")


def tiny_bert(is_decoder: bool) -> transformers.PreTrainedModel:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, is_decoder=is_decoder)
    return transformers.BertForMaskedLM(config).eval()


@pytest.mark.parametrize("is_decoder, message", [(True, "causal LM"), (False, "bidirectionally")])
def test_convert_refuses_unsupported_model_untouched(is_decoder, message):
    """BertForMaskedLM: causal self-attention modules (is_decoder) but no generation, or bidirectional ones.
    Refused with the model as it was, and refused again the same way (not "already converted")."""
    model, ids = tiny_bert(is_decoder), torch.randint(0, VOCAB, (2, 9))
    before = snapshot(model, ids)
    for _ in range(2):
        with pytest.raises(ValueError, match=message):
            convert(model, topk=3, window=2)
        assert_unchanged(model, before, ids)


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), -float("inf"), "0.1", None, True])
def test_convert_refuses_bad_slope_untouched(slope):
    model, ids = tiny_model("llama"), torch.randint(0, VOCAB, (2, 9))
    before = snapshot(model, ids)
    with pytest.raises(ValueError, match="slope"):
        convert(model, topk=3, window=2, slope=slope)
    assert_unchanged(model, before, ids)
    assert converted_layers(convert(model, topk=3, window=2, slope=0.5)) == [0, 1]
    assert model.config.sparsek["slope"] == 0.5 and model.config._attn_implementation == "sparsek"


@pytest.mark.parametrize("name,value", [("topk", 3.0), ("topk", True), ("topk", -1), ("window", "2"),
                                        ("window", None)])
def test_convert_names_a_bad_topk_or_window_untouched(name, value):
    """topk and window must be ints >= 0: the error names the one that is not, and the model stays as it was."""
    model, ids = tiny_model("llama"), torch.randint(0, VOCAB, (2, 9))
    before = snapshot(model, ids)
    with pytest.raises(ValueError, match=rf"^{name} must be an int >= 0, got {re.escape(repr(value))}$"):
        convert(model, **{"topk": 3, "window": 2, name: value})
    assert_unchanged(model, before, ids)


def test_convert_failing_part_way_is_undone(monkeypatch):
    """A failure after the scorers, hooks, settings and attention were put in (here: installing generate()'s
    cache) takes them all out again; the same model then converts and decodes."""
    import sparsek.integrations.hf as hf

    def broken(*args, **kwargs):
        raise RuntimeError("generation cache broke")

    model, ids = tiny_model("llama"), torch.randint(0, VOCAB, (2, 9))
    before = snapshot(model, ids)
    with monkeypatch.context() as patch:
        patch.setattr(hf, "default_generation_cache", broken)
        with pytest.raises(RuntimeError, match="generation cache broke"):
            convert(model, topk=3, window=2, layers=[1])
    assert_unchanged(model, before, ids)
    assert getattr(model, "generation_cache_factory", None) is None
    convert(model, topk=3, window=2, slope=0.05)
    with torch.no_grad():
        got, _ = logits_step_by_step(model, ids, 4)
        torch.testing.assert_close(got, model(ids, use_cache=False).logits, atol=2e-5, rtol=2e-5)
