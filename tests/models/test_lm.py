"""The from-scratch language model: every attention variant trains, stays causal, and the SparseK variants
decode with their constant-memory cache exactly as the parallel forward predicts."""

import pytest
import torch

from sparsek.baselines import fixed_mask
from sparsek.models import ATTENTIONS, VARIANTS, LMConfig, TransformerLM


def tiny(attention: str, **overrides) -> LMConfig:
    options = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, attention=attention, budget=8, context=32)
    return LMConfig(**{**options, **overrides})


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_variant_trains_with_falling_loss(attention):
    torch.manual_seed(0)
    model = TransformerLM(tiny(attention))
    # A repeating pattern longer than the budget: learnable from context, impossible from a unigram alone.
    tokens = torch.randint(0, 256, (4, 12)).repeat(1, 3)[:, :33]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model.token_losses(tokens).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    if attention.startswith("sparsek"):  # the scorer is trained, not left at zero
        assert model.blocks[0].attn.scorer.weight.abs().sum() > 0


@pytest.mark.parametrize("attention", [a for a in ATTENTIONS if a != "hash"])
def test_future_tokens_do_not_change_earlier_logits(attention):
    # hash is left out on purpose: its chunk boundaries depend on where later tokens hash (as in Reformer).
    torch.manual_seed(1)
    model = TransformerLM(tiny(attention)).double()
    with torch.no_grad():  # a scorer that ranks by content, not recency alone
        for block in model.blocks:
            if block.attn.scorer is not None:
                block.attn.scorer.weight.normal_()
    ids = torch.randint(0, 256, (2, 40))
    changed = ids.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    torch.testing.assert_close(model(ids)[:, :25], model(changed)[:, :25], rtol=0, atol=1e-12)


@pytest.mark.parametrize("attention", ["sparsek", "sparsek_window"])
@pytest.mark.parametrize("prompt_len", [1, 5, 30])
def test_cached_generation_equals_recomputing_the_prefix(attention, prompt_len):
    torch.manual_seed(2)
    model = TransformerLM(tiny(attention)).double().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.scorer.weight.normal_(std=0.5)
    ids = torch.randint(0, 256, (2, prompt_len))
    generated = model.generate(ids, 40, temperature=0)       # runs 4x past the budget of 8
    assert generated.shape == (2, prompt_len + 40)
    assert torch.equal(generated[:, :prompt_len], ids)
    # The oracle: the parallel forward over the whole prefix at every step.
    logits = model(generated[:, :-1])[:, prompt_len - 1:]
    assert torch.equal(logits.argmax(-1), generated[:, prompt_len:])


def test_sampling_is_reproducible_and_respects_top_k():
    model = TransformerLM(tiny("sparsek_window")).eval()
    ids = torch.zeros(1, 3, dtype=torch.long)
    first = model.generate(ids, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    second = model.generate(ids, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, second)
    # top_k=1 leaves one candidate: sampling at any temperature is greedy decoding
    sampled = model.generate(ids, 20, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, model.generate(ids, 20, temperature=0))


def test_budgets_of_the_variants():
    config = tiny("sparsek_window", budget=9, context=64)
    assert config.sparsek_budget() == (4, 5)
    assert tiny("sparsek", budget=9).sparsek_budget() == (9, 0)
    local, stride = tiny("fixed", budget=8, context=64).fixed_pattern()
    # at the training context's last position the fixed pattern holds at most the budget of keys
    assert fixed_mask(64, local, stride)[-1].sum() <= 8
    chunk, rotations = tiny("hash", budget=8, context=64).hash_buckets()
    assert 2 * chunk <= 8 and rotations >= 1


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny("linear")
    with pytest.raises(ValueError, match="budget"):
        tiny("window", budget=1)
    with pytest.raises(ValueError, match="n_heads"):
        tiny("full", n_heads=3)
    with pytest.raises(ValueError, match="slope"):
        tiny("sparsek_window", slope=1.0)
    with pytest.raises(ValueError, match="ids must be"):
        TransformerLM(tiny("full")).generate(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_k"):
        TransformerLM(tiny("full")).generate(torch.zeros(1, 3, dtype=torch.long), 2, top_k=0)


def test_a_registered_variant_is_one_entry_and_one_function(monkeypatch):
    """A new baseline: one VARIANTS entry; the config, the model and the CLI's choices take it from there."""
    from sparsek.cli import _choices
    from sparsek.models.variants import Variant

    def first_keys(layer, q, k, v):            # each query sees the first `budget` keys (and itself)
        t_len = q.shape[1]
        allowed = torch.ones(t_len, t_len, dtype=torch.bool).tril()
        allowed[:, layer.lm_config.budget:] &= torch.eye(t_len, dtype=torch.bool)[:, layer.lm_config.budget:]
        groups = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), attn_mask=allowed)
        return out.transpose(1, 2)

    monkeypatch.setitem(VARIANTS, "first_keys", Variant("the first `budget` keys", first_keys))
    config = LMConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, attention="first_keys",
                      budget=4, context=16)
    model = TransformerLM(config)
    ids = torch.randint(0, 32, (2, 12))
    logits = model(ids)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 32     # position 6 is beyond the first 4: later rows cannot see it
    later = model(changed)
    torch.testing.assert_close(logits[:, 7:], later[:, 7:])
    assert "first_keys" in _choices("attention", LMConfig)
    assert model.blocks[0].attn.scorer is None


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_variant_pickles_and_baselines_have_no_cache(attention, tmp_path):
    import io
    model = TransformerLM(LMConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                   attention=attention, budget=4, context=16))
    buffer = io.BytesIO()
    torch.save(model, buffer)                  # the whole model, as some users save it
    if not VARIANTS[attention].sparsek:
        with pytest.raises(ValueError, match="no SparseK cache"):
            model.blocks[0].attn.step(torch.randn(1, 1, 32), 0, None)
