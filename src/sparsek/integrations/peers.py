"""Constant-budget KV cache methods that SparseK is compared against, inside transformers (5.x) models.

At the same budget B of key/value pairs per layer and KV head:
  * "streaming_llm" (StreamingLLM, Xiao et al. 2023): the first `sinks` tokens and the B - sinks newest.
  * "h2o" (H2O, Zhang et al. 2023): the `recent` newest tokens (default B // 2) and the B - recent older ones
    with the largest accumulated attention: over all queries so far, the softmax probability each key received,
    summed over the query heads of its KV group.
  * "snapkv" (SnapKV, Li et al. 2024): the last `obs` prompt tokens (the observation window) and the B - obs
    earlier ones whose observation scores (softmax probabilities from the window's queries, summed over those
    queries and the group's query heads), max-pooled over `kernel` neighbouring keys, are largest.
Ties go to the newer key (as in SparseK's selection). The rules are the pure functions `streaming_llm_keep`,
`h2o_keep` and `snapkv_keep` (scores from `attention_mass`); `keep_indices` composes them from queries and keys.

Protocol (kvpress's): `compress(model, method, budget)` switches the model, in place, to the "peers" attention
implementation registered here; run it with a `PeerCache` (generate() makes one unless given a cache):

    compress(model, "snapkv", 512)
    cache = PeerCache()
    model(context_ids, cache=cache)     # prefill: exact causal attention, then each compressed layer keeps B pairs
    model(question_ids, cache=cache)    # attends to the kept pairs plus itself (causally); appended to the cache

  * The first forward call on an empty PeerCache is the prefill. Right after its (exact) attention, each
    compressed layer keeps min(B, T) pairs per KV head, chosen from that call's queries and keys.
  * Later calls attend to the cached pairs plus their own tokens causally, then append their tokens. With
    eviction (default for streaming_llm and h2o; snapkv compresses once and then grows, as in the paper and
    kvpress) the layer is cut back to B pairs after each call by the same rule: StreamingLLM keeps sinks + newest;
    H2O adds the call's attention probabilities (over the kept pairs and the call's tokens) to the accumulated
    scores, then keeps recent + heaviest. Eviction happens per call, so tokens fed one at a time are exactly the
    streaming methods' decoding; the tokens of one multi-token call all see the cache as it was before the call.
  * Keys are cached after RoPE, so kept pairs keep their positions; the cache reports the number of tokens seen
    (not kept) as its length, so the position ids transformers derives for later tokens continue the sequence.
  * Layers not compressed keep every key and value and run exact causal attention, within the model's
    sliding_window for the layers that have one (Gemma 3's local layers).
  * No padding: an attention_mask with zeros raises. use_cache=False runs the model exactly (nothing to compress).

Shapes: B batch, T queries, S keys (cached + new), Hq / H query / KV heads (G = Hq // H), D head dim, n kept.
Public functions take q, k as [B, T, Hq, D] and [B, S, H, D]; scores and kept indices are per KV head,
[B, H, S] and [B, H, n], as the cache stores keys and values [B, H, S, D] (transformers' layout).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

from .hf import (
    ForgettingLayer,
    FullKVLayer,
    attention_modules,
    cache_kwarg,
    causal_attention,
    default_generation_cache,
    padding_mask,
)

IMPLEMENTATION = "peers"
METHODS = ("streaming_llm", "h2o", "snapkv")
QUERY_CHUNK = 1024  # queries per block when summing attention probabilities: [B, Hq, chunk, S] floats at a time


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class PeerSettings:
    """A method and its parameters, checked; `recent` and `evict` filled in when left None."""

    method: str
    budget: int
    sinks: int = 4
    recent: int | None = None
    obs: int = 32
    kernel: int = 7
    evict: bool | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("budget", "sinks", "obs", "kernel") + (("recent",) if self.recent is not None else ()):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 key/value pairs per layer and KV head, got {self.budget}")
        if self.method == "streaming_llm" and not 0 <= self.sinks <= self.budget:
            raise ValueError(f"streaming_llm needs 0 <= sinks <= budget, got sinks={self.sinks}, budget={self.budget}")
        if self.method == "h2o":
            recent = self.budget // 2 if self.recent is None else self.recent
            if not 0 <= recent <= self.budget:
                raise ValueError(f"h2o needs 0 <= recent <= budget, got recent={recent}, budget={self.budget}")
            object.__setattr__(self, "recent", recent)
        if self.method == "snapkv":
            if self.obs < 1 or self.budget <= self.obs:
                raise ValueError(f"snapkv needs 1 <= obs < budget (the observation window is kept whole, plus at "
                                 f"least one earlier key), got obs={self.obs}, budget={self.budget}")
            if self.kernel < 1 or self.kernel % 2 == 0:
                raise ValueError(f"snapkv's pooling kernel must be odd and >= 1 (same-length max-pool), "
                                 f"got {self.kernel}")
        if self.evict is None:
            object.__setattr__(self, "evict", self.method != "snapkv")
        elif not isinstance(self.evict, bool):
            raise ValueError(f"evict must be a bool or None, got {self.evict!r}")
        elif self.evict and self.method == "snapkv":
            raise ValueError("snapkv compresses the prompt once; it has no eviction rule for later tokens")


# ----------------------------------------------------------------------------------------------- selection rules


def top_indices(scores: Tensor, k: int) -> Tensor:
    """scores [..., S] -> indices [..., k] of the k largest, ties to the newer (higher) index, sorted ascending."""
    n = scores.shape[-1]
    # A stable sort of the reversed scores puts, among equal scores, the newest key first.
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
    return (n - 1 - order).sort(dim=-1).values


def attention_mass(queries: Tensor, keys: Tensor, scale: float | None = None, chunk: int = QUERY_CHUNK) -> Tensor:
    """Causal attention probabilities each key receives, summed over the queries and the query heads of its group.

    queries [B, T, Hq, D] are the last T of the S positions of keys [B, S, H, D] (T <= S; query t sees keys
    0 .. S - T + t). Returns [B, H, S] in float32 (float64 for float64 inputs). Blocks of `chunk` queries bound
    the memory to [B, Hq, chunk, S] probabilities.
    """
    batch, t_len, n_q, dim = queries.shape
    s_len, n_kv = keys.shape[1], keys.shape[2]
    if t_len > s_len or n_q % n_kv or keys.shape[0] != batch or keys.shape[3] != dim:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not fit: need T <= S, "
                         "the same batch and head dim, and query heads a multiple of KV heads")
    scale = dim ** -0.5 if scale is None else scale
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q = queries.to(dtype).view(batch, t_len, n_kv, n_q // n_kv, dim).permute(0, 2, 3, 1, 4)   # [B, H, G, T, D]
    k = keys.to(dtype).permute(0, 2, 3, 1).unsqueeze(2)                                        # [B, H, 1, D, S]
    mass = torch.zeros(batch, n_kv, s_len, dtype=dtype, device=queries.device)
    offset = s_len - t_len
    for start in range(0, t_len, chunk):
        stop = min(start + chunk, t_len)
        visible = offset + stop                                       # keys any query of the block may see
        logits = (q[:, :, :, start:stop] @ k[..., :visible]) * scale   # [B, H, G, c, visible]
        q_pos = torch.arange(offset + start, offset + stop, device=q.device)[:, None]
        future = torch.arange(visible, device=q.device) > q_pos        # [c, visible]
        probs = logits.masked_fill_(future, float("-inf")).softmax(dim=-1)
        mass[..., :visible] += probs.sum(dim=(2, 3))
    return mass


def streaming_llm_keep(length: int, budget: int, sinks: int = 4, device: torch.device | str | None = None) -> Tensor:
    """StreamingLLM: the first `sinks` positions and the budget - sinks newest of `length` -> [min(budget, length)]."""
    if length <= budget:
        return torch.arange(length, device=device)
    return torch.cat([torch.arange(sinks, device=device),
                      torch.arange(length - (budget - sinks), length, device=device)])


def h2o_keep(scores: Tensor, budget: int, recent: int) -> Tensor:
    """H2O: accumulated attention scores [B, H, S] -> kept indices [B, H, min(budget, S)], ascending: the
    `recent` newest and the budget - recent heaviest of the others."""
    batch, heads, s_len = scores.shape
    if s_len <= budget:
        return torch.arange(s_len, device=scores.device).expand(batch, heads, s_len)
    heavy = top_indices(scores[..., :s_len - recent], budget - recent)
    newest = torch.arange(s_len - recent, s_len, device=scores.device).expand(batch, heads, recent)
    return torch.cat([heavy, newest], dim=-1)


def snapkv_keep(scores: Tensor, budget: int, obs: int = 32, kernel: int = 7) -> Tensor:
    """SnapKV: observation scores [B, H, S] (attention from the last `obs` queries) -> kept indices
    [B, H, min(budget, S)], ascending: the top budget - obs of the first S - obs keys by their scores max-pooled
    over `kernel` neighbours (stride 1, same length), then the observation window."""
    batch, heads, s_len = scores.shape
    if s_len <= budget:
        return torch.arange(s_len, device=scores.device).expand(batch, heads, s_len)
    prefix = s_len - obs
    pooled = nn.functional.max_pool1d(scores[..., :prefix], kernel, stride=1, padding=kernel // 2)   # [B, H, prefix]
    window = torch.arange(prefix, s_len, device=scores.device).expand(batch, heads, obs)
    return torch.cat([top_indices(pooled, budget - obs), window], dim=-1)


def _select(settings: PeerSettings, queries: Tensor, keys: Tensor, scale: float | None,
            chunk: int = QUERY_CHUNK) -> tuple[Tensor, Tensor | None]:
    """Kept indices [B, H, n] after a prefill (queries [B, T, Hq, D], the last T of keys [B, S, H, D]) and, for
    h2o, the accumulated scores [B, H, S] they came from."""
    batch, s_len, n_kv = keys.shape[:3]
    if settings.method == "streaming_llm":
        kept = streaming_llm_keep(s_len, settings.budget, settings.sinks, keys.device)
        return kept.expand(batch, n_kv, kept.shape[0]), None
    if settings.method == "h2o":
        scores = attention_mass(queries, keys, scale, chunk)
        return h2o_keep(scores, settings.budget, settings.recent), scores
    if s_len <= settings.budget:
        return torch.arange(s_len, device=keys.device).expand(batch, n_kv, s_len), None
    if queries.shape[1] < settings.obs:
        raise ValueError(f"snapkv needs the last obs={settings.obs} queries, got {queries.shape[1]}")
    scores = attention_mass(queries[:, -settings.obs:], keys, scale, chunk)
    return snapkv_keep(scores, settings.budget, settings.obs, settings.kernel), None


def keep_indices(method: str, queries: Tensor, keys: Tensor, budget: int, *, scale: float | None = None,
                 sinks: int = 4, recent: int | None = None, obs: int = 32, kernel: int = 7,
                 chunk: int = QUERY_CHUNK) -> Tensor:
    """The pairs `method` keeps after a prefill: queries [B, T, Hq, D] (the last T of the S positions; T = S
    for a prefill), keys [B, S, H, D] -> LongTensor [B, H, min(budget, S)] of key indices, ascending.
    scale: the softmax scale (default D ** -0.5); the other arguments as in `compress`."""
    settings = PeerSettings(method, budget, sinks=sinks, recent=recent, obs=obs, kernel=kernel)
    return _select(settings, queries, keys, scale, chunk)[0]


# --------------------------------------------------------------------------------------------------- the cache


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, S, ...] at index [B, H, n] along S -> [B, H, n, ...]."""
    return x.gather(2, index.view(*index.shape, *(1,) * (x.dim() - 3)).expand(*index.shape, *x.shape[3:]))


class PeerLayer(ForgettingLayer):
    """One compressed layer of `PeerCache`: the kept keys and values [B, H, n, D], in sequence order, with
    `positions` [B, H, n] (each pair's index in the sequence) and, for h2o, the accumulated `scores` [B, H, n]."""

    is_croppable = False

    def __init__(self, settings: PeerSettings, **kwargs):
        super().__init__()
        self.settings = settings
        self.prefilled = False
        self.positions: Tensor | None = None
        self.scores: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.device = key_states.device
        self.keys = key_states.new_empty(batch, heads, 0, key_states.shape[-1])
        self.values = value_states.new_empty(batch, heads, 0, value_states.shape[-1])
        self.positions = torch.empty(batch, heads, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Appends the new keys and values [B, H, T, D]; returns all cached ones, for the attention function."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, t_len = key_states.shape[:3]
        new_positions = torch.arange(self.seen, self.seen + t_len, device=self.device).expand(batch, heads, t_len)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        self.seen += t_len
        return self.keys, self.values

    @torch.no_grad()
    def compress(self, queries: Tensor, scale: float | None) -> None:
        """After the attention of a call whose queries [B, T, Hq, D] are the last T cached positions: the prefill's
        selection (first call) or, with eviction, the cut back to the budget."""
        settings, keys = self.settings, self.keys.transpose(1, 2)                 # [B, S, H, D]
        if not self.prefilled:
            self.prefilled = True
            kept, self.scores = _select(settings, queries, keys, scale)
        elif settings.evict:
            if settings.method == "h2o":
                new = self.scores.new_zeros(*self.scores.shape[:2], queries.shape[1])
                self.scores = torch.cat([self.scores, new], dim=-1) + attention_mass(queries, keys, scale)
                kept = h2o_keep(self.scores, settings.budget, settings.recent)
            else:
                kept = streaming_llm_keep(keys.shape[1], settings.budget, settings.sinks, keys.device)
                kept = kept.expand(*self.positions.shape[:2], kept.shape[0])
        else:
            return
        if kept.shape[-1] == self.keys.shape[-2]:
            return                                                               # nothing over budget
        self.keys, self.values = _gather(self.keys, kept), _gather(self.values, kept)
        self.positions = _gather(self.positions, kept)
        if self.scores is not None:
            self.scores = _gather(self.scores, kept)

    def kv_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes if self.is_initialized else 0

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.scores = None
        self.is_initialized = self.prefilled = False
        self.seen = 0

    def _select_rows(self, rows: Tensor) -> None:
        if self.is_initialized:
            rows = rows.to(self.keys.device)
            self.keys, self.values = self.keys[rows], self.values[rows]
            self.positions = self.positions[rows]
            self.scores = self.scores[rows] if self.scores is not None else None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a compressed KV cache forgets evicted tokens for good: it cannot be rolled back")


class PeerCache(Cache):
    """A transformers `Cache` for models prepared by `compress`: a `PeerLayer` (B pairs per KV head after the
    prefill) per compressed layer, a `FullKVLayer` per other layer. Made on first use by the model's pre-hooks."""

    def __init__(self, *args, **kwargs):
        super().__init__(layers=[])

    def layer(self, layer_idx: int, settings: PeerSettings | None) -> PeerLayer | FullKVLayer:
        """The cache of layer `layer_idx`: a PeerLayer under `settings`, or a FullKVLayer for settings None."""
        if layer_idx > len(self.layers):
            raise ValueError(f"PeerCache layers are made in order: layer {layer_idx} came before layer "
                             f"{len(self.layers)}")
        if layer_idx == len(self.layers):
            self.layers.append(FullKVLayer() if settings is None else PeerLayer(settings))
        layer = self.layers[layer_idx]
        if getattr(layer, "settings", None) != settings:
            raise ValueError(f"this PeerCache was filled under other settings for layer {layer_idx} "
                             f"({getattr(layer, 'settings', None)}, now {settings}): use a new PeerCache")
        return layer

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError("PeerCache works only with models prepared by sparsek.integrations.peers.compress()")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_bytes(self) -> int:
        """Bytes of cached keys and values over all layers (compressed and full)."""
        return sum(layer.kv_bytes() for layer in self.layers)


# ------------------------------------------------------------------------------------ the attention function


def _unpadded_mask(attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """hf's `padding_mask`, for batches without padding only: the peers take none, so the 2D mask must be all
    ones."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("the KV compression peers take batches without padding: attention_mask has zeros")
    return padding_mask(attention_mask, **kwargs)


def peer_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           peer_layer: PeerLayer | FullKVLayer | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: query [B, Hq, T, D], key, value [B, H, S, D] (the layer's cache after
    appending the T new tokens) -> ([B, T, Hq, D], None). Exact causal attention over what the cache holds; then,
    in a compressed layer, the cache is compressed (after the prefill) or cut back to the budget (eviction)."""
    unsupported = {name: kwargs[name] for name in ("softcap", "s_aux") if kwargs.get(name) is not None}
    if dropout or unsupported:
        raise ValueError(f"peer attention does not implement {sorted(unsupported) + ['dropout'] * bool(dropout)}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"peer attention takes a 2D [B, S] padding mask, got shape {tuple(attention_mask.shape)}")
    sliding_window = kwargs.get("sliding_window")
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else value.dtype
    q, k, v = (x.to(dtype) for x in (query, key, value))
    if not isinstance(peer_layer, PeerLayer):   # a layer left alone, or no cache (use_cache=False): exact
        return causal_attention(q, k, v, attention_mask, scaling, sliding_window), None
    if sliding_window is not None:
        raise ValueError(f"layer {module.layer_idx} has a sliding window of {sliding_window}: compress only "
                         "full-attention layers")
    out = causal_attention(q, k, v, None, scaling)
    peer_layer.compress(q.transpose(1, 2), scaling)
    return out, None


AttentionInterface.register(IMPLEMENTATION, peer_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, _unpadded_mask)


# -------------------------------------------------------------------------------------- preparing a model


def _peer_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Before each attention call: the module's layer of the PeerCache, under the module's settings."""
    cache, settings = cache_kwarg(kwargs), module.peer_settings
    if isinstance(cache, PeerCache):
        kwargs["peer_layer"] = cache.layer(module.layer_idx, settings)
    elif cache is not None and settings is not None:
        raise ValueError(f"a model prepared by compress() needs a PeerCache (generate() makes one), got a "
                         f"{type(cache).__name__}")
    return args, kwargs


def full_attention_layers(model: PreTrainedModel) -> list[int]:
    """Indices of the attention layers without a sliding window (config.layer_types), e.g. Gemma 3's global
    layers; every attention layer for models with no layer_types (Llama, Qwen2, ...)."""
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    available = sorted(module.layer_idx for module in attention_modules(model))
    if not layer_types:
        return available
    return [i for i in available if layer_types[i] != "sliding_attention"]


def _layer_indices(layers: Sequence[int] | str | None, model: PreTrainedModel) -> list[int]:
    """`compress`'s layers checked, sorted."""
    full = full_attention_layers(model)
    if layers is None or (isinstance(layers, str) and layers == "global"):
        if not full:
            raise ValueError(f"{type(model).__name__} has no full-attention layer to compress")
        return full
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f'layers must be a non-empty sequence of layer indices, "global" or None, got {layers!r}')
    available = sorted(module.layer_idx for module in attention_modules(model))
    wrong = [i for i in layers if not _is_int(i) or i not in available]
    if wrong:
        raise ValueError(f"layers must be attention layer indices from 0 to {available[-1]}, got {wrong}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has duplicates: {list(layers)}")
    sliding = sorted(set(layers) - set(full))
    if sliding:
        raise ValueError(f"layers {sliding} are sliding-window layers: compress only full-attention layers "
                         f"({full})")
    return sorted(int(i) for i in layers)


def compress(model: PreTrainedModel, method: str, budget: int, *, layers: Sequence[int] | str | None = None,
             sinks: int = 4, recent: int | None = None, obs: int = 32, kernel: int = 7,
             evict: bool | None = None) -> PreTrainedModel:
    """Run `model` (a transformers causal LM) with `method`'s KV cache of `budget` pairs per layer and KV head,
    in place; returns the model. Call again to switch method or settings (use a new PeerCache then).

    method: "streaming_llm" (sinks), "h2o" (recent, default budget // 2) or "snapkv" (obs, kernel).
    layers: the layers to compress (indices as in module.layer_idx); None or "global" = every layer without a
    sliding window (all of them in Llama or Qwen2, the global ones in Gemma 3). The others keep a full cache.
    evict: cut the cache back to `budget` after each call following the prefill (default: True for
    streaming_llm and h2o; snapkv has no eviction rule). See the module docstring for the protocol.
    """
    settings = PeerSettings(method, budget, sinks=sinks, recent=recent, obs=obs, kernel=kernel, evict=evict)
    modules = attention_modules(model)
    if any(hasattr(module, "sparsek_scorer") for module in modules):
        raise ValueError("model is converted to SparseK; compress the original model")
    bidirectional = sorted(module.layer_idx for module in modules if getattr(module, "is_causal", True) is False)
    if bidirectional:
        raise ValueError(f"layers {bidirectional} attend bidirectionally; the peers are for causal LMs")
    compressed = _layer_indices(layers, model)
    for module in modules:
        if not hasattr(module, "peer_settings"):
            module.register_forward_pre_hook(_peer_hook, with_kwargs=True)
        module.peer_settings = settings if module.layer_idx in compressed else None
    model.config.peers = {"method": method, "budget": budget, "layers": compressed}
    model.set_attn_implementation(IMPLEMENTATION)
    default_generation_cache(model, PeerCache)
    return model
