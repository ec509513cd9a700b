"""The KV compression peers (StreamingLLM, H2O, SnapKV): kept sets against their definitions recomputed here
densely in float64, exact budgets, exactness with budget >= T, positions after compression, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from sparsek.integrations.hf import FullKVLayer, cache_argument, convert  # noqa: E402
from sparsek.integrations.peers import (  # noqa: E402
    METHODS,
    PeerCache,
    PeerLayer,
    PeerSettings,
    compress,
    keep_indices,
    top_indices,
)

VOCAB = 61
OPTIONS = {"streaming_llm": dict(sinks=3), "h2o": dict(recent=5), "snapkv": dict(obs=6)}


def tiny_model(family: str, n_layers: int = 3) -> transformers.PreTrainedModel:
    """Random, 4 query heads on 2 (llama) or 1 (qwen2) KV heads, head dim 8."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, max_position_embeddings=256)
    config = (transformers.LlamaConfig(num_key_value_heads=2, **common) if family == "llama"
              else transformers.Qwen2Config(num_key_value_heads=1, **common))
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def run(model, ids, cache):
    return model(ids, use_cache=True, **{cache_argument(model): cache}).logits


# ------------------------------------------------------------------ the definitions, densely, in float64


def dense_mass(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, T, Hq, D] (the last T of S positions), k [B, S, H, D] -> [B, H, S]: column sums of the causal
    softmax(q k^T * scale), summed over each KV head's query heads."""
    q, k = q.double(), k.double()
    t_len, s_len, groups = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    logits = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(groups, dim=2)) * scale
    future = torch.arange(s_len)[None, :] > torch.arange(s_len - t_len, s_len)[:, None]
    mass = logits.masked_fill(future, float("-inf")).softmax(-1).sum(2)                # [B, Hq, S]
    return mass.view(mass.shape[0], k.shape[2], groups, s_len).sum(2)


def best(scores: list[float], candidates: list[int], n: int) -> set[int]:
    """The n candidates with the largest scores, ties to the newer position."""
    return set(sorted(candidates, key=lambda i: (-scores[i], -i))[:n])


def reference_keep(method: str, q: torch.Tensor, k: torch.Tensor, budget: int, scale: float, sinks: int = 4,
                   recent: int | None = None, obs: int = 32, kernel: int = 7) -> list[list[set[int]]]:
    """Kept positions per batch row and KV head, straight from each method's definition."""
    batch, s_len, heads = k.shape[:3]
    if s_len <= budget:
        return [[set(range(s_len))] * heads] * batch
    if method == "streaming_llm":
        return [[set(range(sinks)) | set(range(s_len - (budget - sinks), s_len))] * heads] * batch
    if method == "h2o":
        recent = budget // 2 if recent is None else recent
        mass = dense_mass(q, k, scale)
        return [[best(mass[b, h].tolist(), list(range(s_len - recent)), budget - recent)
                 | set(range(s_len - recent, s_len)) for h in range(heads)] for b in range(batch)]
    mass = dense_mass(q[:, -obs:], k, scale)
    prefix, half = s_len - obs, kernel // 2
    kept = []
    for b in range(batch):
        kept.append([])
        for h in range(heads):
            pooled = [max(mass[b, h, max(0, j - half):min(prefix, j + half + 1)]).item() for j in range(prefix)]
            kept[b].append(best(pooled, list(range(prefix)), budget - obs) | set(range(prefix, s_len)))
    return kept


def as_sets(index: torch.Tensor) -> list[list[set[int]]]:
    return [[set(row.tolist()) for row in head] for head in index]


# ---------------------------------------------------------------------------------------------- the rules


def test_top_indices_ties_go_to_the_newer_key():
    scores = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0, 0.5]])
    assert top_indices(scores, 2).tolist() == [[2, 4]]
    assert top_indices(scores, 4).tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [9, 16, 37, 50])
def test_keep_indices_match_the_definitions(method, budget):
    """Random GQA queries and keys (4 query heads on 2 KV heads); blocks of 5 queries exercise the chunking."""
    torch.manual_seed(1)
    q, k = torch.randn(2, 37, 4, 8, dtype=torch.float64), torch.randn(2, 37, 2, 8, dtype=torch.float64)
    options = {"streaming_llm": dict(sinks=3), "h2o": dict(recent=4), "snapkv": dict(obs=5)}[method]
    kept = keep_indices(method, q, k, budget, scale=0.7, chunk=5, **options)
    assert kept.shape == (2, 2, min(budget, 37))
    assert (kept.diff(dim=-1) > 0).all()
    assert as_sets(kept) == reference_keep(method, q, k, budget, 0.7, **options)


def test_snapkv_pooling_spreads_a_peak_to_its_neighbours():
    """One key gets all the observation attention: the pooled scores select it and its kernel // 2 neighbours."""
    k = torch.zeros(1, 40, 1, 4, dtype=torch.float64)
    k[0, 20, 0, 0] = 50.0
    q = torch.zeros(1, 40, 1, 4, dtype=torch.float64)
    q[..., 0] = 1.0
    kept = keep_indices("snapkv", q, k, budget=15, obs=8, kernel=7)
    assert kept[0, 0].tolist() == list(range(17, 24)) + list(range(32, 40))


# ------------------------------------------------------------------------------------------- in a model


@pytest.fixture
def recorded(monkeypatch):
    """Every call of the peers' attention function: (layer index, query [B, Hq, T, D], key [B, H, S, D], scale)."""
    calls = []
    inner = ALL_ATTENTION_FUNCTIONS["peers"]

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        calls.append((module.layer_idx, query.detach().clone(), key.detach().clone(), scaling))
        return inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "peers", record)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_prefill_keeps_the_budget_chosen_by_the_definition(recorded, family, method):
    model = compress(tiny_model(family).double(), method, 12, layers=[0, 2], **OPTIONS[method])
    cache = PeerCache()
    run(model, torch.randint(0, VOCAB, (2, 40)), cache)
    assert cache.get_seq_length() == 40
    assert isinstance(cache.layers[1], FullKVLayer) and cache.layers[1].keys.shape[2] == 40
    for layer_idx, query, key, scale in recorded:
        layer = cache.layers[layer_idx]
        if layer_idx == 1:
            continue
        assert isinstance(layer, PeerLayer) and layer.keys.shape == (2, key.shape[1], 12, 8)
        want = reference_keep(method, query.transpose(1, 2), key.transpose(1, 2), 12, scale, **OPTIONS[method])
        assert as_sets(layer.positions) == want
        torch.testing.assert_close(layer.keys, key.gather(2, layer.positions[..., None].expand(-1, -1, -1, 8)),
                                   rtol=0, atol=0)


def h2o_reference(steps: list[tuple[torch.Tensor, torch.Tensor]], budget: int, recent: int, scale: float
                  ) -> list[list[list[int]]]:
    """H2O while decoding, from its definition. steps: per call, its queries [1, t, Hq, D] and new keys
    [1, t, H, D]. Each query's softmax runs over the pairs kept before its call plus the call's tokens up to
    itself; every key's probabilities accumulate; after each call the `recent` newest and the heaviest others
    are kept. Returns the kept positions per call and KV head."""
    bank, scores, kept, out, seen = {}, {}, None, [], 0
    for queries, new_keys in steps:
        t_len, heads = new_keys.shape[1], new_keys.shape[2]
        groups = queries.shape[2] // heads
        for i in range(t_len):
            bank[seen + i] = new_keys[0, i]                                         # [H, D]
        kept_now = []
        for h in range(heads):
            candidates = (kept[h] if kept else []) + list(range(seen, seen + t_len))
            keys = torch.stack([bank[p][h] for p in candidates])[None, :, None]    # [1, S, 1, D]
            mass = dense_mass(queries[:, :, h * groups:(h + 1) * groups], keys, scale)[0, 0]
            for p, m in zip(candidates, mass.tolist()):
                scores[h, p] = scores.get((h, p), 0.0) + m
            if len(candidates) > budget:
                heavy = best({p: scores[h, p] for p in candidates}, candidates[:-recent], budget - recent)
                candidates = sorted(heavy | set(candidates[-recent:]))
            kept_now.append(candidates)
        kept, seen = kept_now, seen + t_len
        out.append(kept)
    return out


CALLS = (6, 7, 8, 11, 12, 14, 15, 18, 19, 20, 23, 24, 27, 30)   # where each call ends: a prefill of 6, then 1-3


def test_h2o_eviction_follows_the_accumulated_attention():
    """A PeerLayer fed random peaked queries and keys: new keys that draw attention can displace old ones."""
    torch.manual_seed(2)
    layer = PeerLayer(PeerSettings("h2o", 8, recent=2))
    steps, start = [], 0
    for stop in CALLS:
        q = 2 * torch.randn(1, stop - start, 4, 8, dtype=torch.float64)
        k = torch.randn(1, stop - start, 2, 8, dtype=torch.float64)
        layer.update(k.transpose(1, 2), k.transpose(1, 2))
        layer.compress(q, 1.0)
        steps.append((q, k))
        assert layer.positions[0].tolist() == h2o_reference(steps, 8, 2, 1.0)[-1]
        start = stop
    assert layer.keys.shape == (1, 2, 8, 8) and layer.get_seq_length() == 30
    heavy = layer.positions[0, :, :-2]
    assert heavy.ge(6).any(), heavy                                   # decoded tokens displaced prompt tokens


@torch.no_grad()
def test_h2o_eviction_in_a_model(recorded):
    """The same in a model: each layer's queries and keys, as its attention function got them."""
    model = compress(tiny_model("llama").double(), "h2o", 8, recent=2)
    cache, ids = PeerCache(), torch.randint(0, VOCAB, (1, 30))
    steps, start = [], 0
    for stop in CALLS:
        del recorded[:]
        run(model, ids[:, start:stop], cache)
        _, query, key, scale = recorded[1]                                 # layer 1
        steps.append((query.transpose(1, 2), key.transpose(1, 2)[:, start - stop:]))
        assert cache.layers[1].positions[0].tolist() == h2o_reference(steps, 8, 2, scale)[-1]
        start = stop
    assert cache.get_seq_length() == 30


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_sizes_while_decoding(method):
    """StreamingLLM and H2O stay at the budget (eviction after each call); SnapKV compresses once, then grows."""
    model = compress(tiny_model("qwen2"), method, 12, **OPTIONS[method])
    cache, ids = PeerCache(), torch.randint(0, VOCAB, (2, 40))
    run(model, ids[:, :30], cache)
    for start, stop in ((30, 31), (31, 32), (32, 37), (37, 40)):
        run(model, ids[:, start:stop], cache)
        for layer in cache.layers:
            size = 12 if method != "snapkv" else 12 + stop - 30
            assert layer.keys.shape == (2, 1, size, 8) and layer.values.shape == (2, 1, size, 8)
            assert layer.positions[..., -1].eq(stop - 1).all()
            if method == "streaming_llm":
                assert layer.positions[0, 0].tolist() == [0, 1, 2] + list(range(stop - 9, stop))
        assert cache.get_seq_length() == stop
    assert cache.kv_bytes() == 3 * 2 * 2 * 1 * (12 if method != "snapkv" else 22) * 8 * 4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_budget_at_least_the_length_is_exact(family, method):
    """Prefill 30, then calls of 5, 1 and 4 tokens: every logit equals the uncompressed model's."""
    reference = tiny_model(family)
    model = compress(copy.deepcopy(reference), method, 40, **OPTIONS[method])
    ids = torch.randint(0, VOCAB, (2, 40))
    cache = PeerCache()
    got = torch.cat([run(model, ids[:, a:b], cache) for a, b in ((0, 30), (30, 35), (35, 36), (36, 40))], dim=1)
    torch.testing.assert_close(got, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 40 and all(layer.keys.shape[2] == 40 for layer in cache.layers)
    if family != "llama":
        return
    prompt = ids[:, :20]
    want = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


@torch.no_grad()
def test_positions_continue_after_compression():
    """StreamingLLM keeps the same positions in every layer, so a full model with a 4D mask reproduces it: after a
    prefill of 30 (budget 12, sinks 4), a call of 6 tokens sees positions 0-3, 22-29 and itself causally; the next
    token, after eviction to 0-3 and 28-35, sees those and itself. Wrong RoPE positions would change the logits."""
    reference = tiny_model("llama")
    reference.set_attn_implementation("sdpa")
    model = compress(copy.deepcopy(reference), "streaming_llm", 12, sinks=4)
    ids = torch.randint(0, VOCAB, (2, 37))
    cache = PeerCache()
    run(model, ids[:, :30], cache)
    got = torch.cat([run(model, ids[:, 30:36], cache), run(model, ids[:, 36:37], cache)], dim=1)
    assert cache.get_seq_length() == 37
    allowed = torch.ones(37, 37).tril().bool()
    allowed[30:36, 4:22] = False
    allowed[36, 4:28] = False
    mask = torch.zeros(1, 1, 37, 37).masked_fill(~allowed, torch.finfo(torch.float32).min)
    want = reference(ids, attention_mask=mask).logits[:, 30:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - reference(ids).logits[:, 30:]).abs().max() > 1e-3       # compression does change them


# ---------------------------------------------------------------------------------------------- Gemma 3


def tiny_gemma3() -> transformers.Gemma3ForCausalLM:
    """6 layers, local ones with sliding_window 8, global layers 2 and 5, 4 query heads on 1 KV head."""
    torch.manual_seed(0)
    layer_types = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, sliding_window=8, layer_types=layer_types, max_position_embeddings=256,
        query_pre_attn_scalar=12)
    model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model.eval()


@torch.no_grad()
def test_gemma3_compresses_the_global_layers_and_keeps_the_local_ones_exact():
    reference = tiny_gemma3()
    ids = torch.randint(0, VOCAB, (1, 30))
    want = reference(ids).logits
    model = compress(copy.deepcopy(reference), "snapkv", 30, obs=4)
    assert model.config.peers["layers"] == [2, 5]
    cache = PeerCache()
    got = torch.cat([run(model, ids[:, :24], cache), run(model, ids[:, 24:], cache)], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    compress(model, "h2o", 10)
    cache = PeerCache()
    run(model, ids, cache)
    assert [layer.keys.shape[2] for layer in cache.layers] == [30, 30, 10, 30, 30, 10]
    with pytest.raises(ValueError, match="sliding-window layers"):
        compress(model, "h2o", 10, layers=[0, 2])


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="lru", budget=8), "method must be one of"),
    (dict(method="h2o", budget=0), "budget must be >= 1"),
    (dict(method="h2o", budget=8.0), "budget must be an int"),
    (dict(method="h2o", budget=True), "budget must be an int"),
    (dict(method="streaming_llm", budget=3), "sinks <= budget"),
    (dict(method="h2o", budget=8, recent=9), "recent <= budget"),
    (dict(method="snapkv", budget=32), "obs < budget"),
    (dict(method="snapkv", budget=40, kernel=4), "must be odd"),
    (dict(method="snapkv", budget=40, evict=True), "no eviction rule"),
    (dict(method="h2o", budget=8, layers=[0, 7]), "layer indices from 0 to 2"),
    (dict(method="h2o", budget=8, layers=[1, 1]), "duplicates"),
    (dict(method="h2o", budget=8, layers=[]), "non-empty"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compress(tiny_model("llama"), **kwargs)


@torch.no_grad()
def test_bad_uses_raise():
    ids = torch.randint(0, VOCAB, (2, 12))
    model = compress(tiny_model("llama"), "h2o", 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="without padding"):
        model(ids, attention_mask=mask, **{cache_argument(model): PeerCache()})
    with pytest.raises(ValueError, match="needs a PeerCache"):
        model(ids, use_cache=True, **{cache_argument(model): transformers.DynamicCache()})
    cache = PeerCache()
    run(model, ids, cache)
    compress(model, "streaming_llm", 8)
    with pytest.raises(ValueError, match="other settings"):
        run(model, ids[:, :1], cache)
    with pytest.raises(ValueError, match="compress"):
        run(tiny_model("llama"), ids, PeerCache())
    with pytest.raises(ValueError, match="converted to SparseK"):
        compress(convert(tiny_model("llama"), topk=2, window=2), "h2o", 8)
    with pytest.raises(ValueError, match="obs=32"):
        keep_indices("snapkv", torch.randn(1, 4, 2, 8), torch.randn(1, 40, 2, 8), 36)
