"""SparseK attention inside Hugging Face transformers (5.x) models, without copying model code.

`convert(model, topk=..., window=...)` gives every self-attention module (or those of `layers=[...]`) a
zero-initialised `Scorer` and switches the model to the "sparsek" attention implementation registered here:
  * a forward pre-hook on each attention module computes the scores u = x . w + slope * position from the
    module's input hidden states and hands them, with the layer's cache state, to the attention function;
  * the attention function (transformers' AttentionInterface) attends as a `SparseKAttention` layer does
    (`layers.attention.attend`): `sparsek_attention` over a prompt (left padding handled by packing the real
    tokens) and `SparseKCache.step` token by token when decoding;
  * `SparseKHFCache` is a transformers `Cache` whose layers hold a constant-size `SparseKCache`; `generate()`
    on a converted model uses it unless a cache is passed in.
Layers left out of `layers` keep exact causal attention (through the same attention function, as the
implementation is model-wide) and their own KV cache: the last sliding_window - 1 tokens for a layer that
config.layer_types marks "sliding_attention" (Gemma 2/3's local layers), else every token. So
`convert(gemma3, layers="global")` (the "full_attention" layers only) decodes in constant memory.
RoPE, GQA, QK norms, the query scaling and the projections stay the model's own. Works for any model whose
attention modules follow the transformers 5 pattern (q/k/v after RoPE -> ALL_ATTENTION_FUNCTIONS[
config._attn_implementation]): Llama, Mistral, Qwen2/3, SmolLM2, GPT-NeoX/Pythia, Gemma 3, among others.

Shapes: B batch, T new tokens, Hq / H query / KV heads, D head dim.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

from ..cache import SparseKCache
from ..layers.attention import attend
from ..layers.scorer import SLOPE_CONVERT, Scorer
from ..ops.common import check_budget, check_gate, check_sinks
from ..weights import check_safetensors_folder, load_safetensors

IMPLEMENTATION = "sparsek"
SETTINGS = ("topk", "window", "slope", "gate", "layers", "sinks")


class ForgettingLayer(CacheLayerMixin):
    """A transformers cache layer that keeps fewer tokens than it has seen (SparseK's, the peers'): it reports the
    tokens seen as the sequence length, from which transformers derives the next position ids and mask sizes."""

    is_compileable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0  # tokens passed through, padding included: what transformers calls the sequence length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1


class SparseKLayer(ForgettingLayer):
    """One layer of `SparseKHFCache`: transformers' bookkeeping around a `SparseKCache` (built at prefill).
    A decode step changes the state's tensors in place and never resizes them, so it compiles (`generate()`
    with a compile_config, or torch.compile of the forward)."""

    is_compileable = True

    def __init__(self, **kwargs):
        super().__init__()
        self.state: SparseKCache | None = None
        self.next_positions: Tensor | None = None  # [B, 1] position ids of each row's next token

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Counts the new tokens; the SparseK state itself is updated by the attention function."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.seen and self.state is None:  # the attention function never built the state: not converted
            raise ValueError("SparseKHFCache holds SparseK state only for models converted with sparsek's convert() "
                             "(reload saved ones with sparsek.integrations.hf.load)")
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def kv_bytes(self) -> int:
        return self.state.kv_bytes() if self.state is not None else 0

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self.state is not None:
            self.state.select_rows(beam_idx)
            mark_static(self.state)                    # new tensors: compiled decoding must see fixed addresses

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.batch, device=self.state.keys.device)
            self.state.select_rows(rows.repeat_interleave(repeats))
            mark_static(self.state)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a SparseK cache forgets evicted tokens for good: it cannot be rolled back")

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class FullKVLayer(DynamicLayer):
    """One layer of `SparseKHFCache` (or the peers' `PeerCache`) for a layer left alone: every key and value
    [B, H, S, D], grown by concatenation like transformers' DynamicLayer (whose update returns them all for exact
    attention)."""

    def kv_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes if self.is_initialized else 0

    def reset(self) -> None:
        # Dropped, not zeroed: older transformers (5.17 for one) zero them, which keeps their length.
        self.keys = self.values = None
        self.is_initialized = False


class SlidingKVLayer(DynamicLayer):
    """One layer of `SparseKHFCache` for an unconverted sliding-window layer (window w = sliding_window: each
    query sees itself and the w - 1 tokens before it). Between calls it keeps the last w - 1 keys and values
    [B, H, <= w - 1, D]; `update` returns those followed by the new ones, all that exact sliding-window attention
    of the new tokens needs. The tokens returned are the newest of the sequence, so the last columns of the 2D
    padding mask still describe them (left padding included)."""

    is_sliding = True

    def __init__(self, sliding_window: int, **kwargs):
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be an int >= 1, got {sliding_window!r}")
        super().__init__()
        self.sliding_window = sliding_window
        self.seen = 0  # tokens passed through, padding included: what transformers calls the sequence length

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)                        # [B, H, kept + T, D]
        values = torch.cat([self.values, value_states], dim=-2)
        start = max(keys.shape[-2] - (self.sliding_window - 1), 0)
        # Copies: a view would keep this call's whole tensors (a long prompt's, say) alive until the next call.
        self.keys, self.values = keys[..., start:, :].clone(), values[..., start:, :].clone()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.sliding_window

    def kv_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes if self.is_initialized else 0

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a sliding-window cache forgets old tokens for good: it cannot be rolled back")


class SparseKHFCache(Cache):
    """A transformers `Cache` for converted models: per converted layer, constant KV memory O(topk + window);
    per layer left unconverted, the last sliding_window - 1 tokens (a sliding-window layer, constant too) or the
    full KV cache that grows with every token."""

    def __init__(self, *args, compileable: bool = False, **kwargs):
        # Layers no pre-hook claimed (a model never converted) get SparseKLayers, which refuse to decode.
        super().__init__(layer_class_to_replicate=SparseKLayer)
        self.compileable = compileable

    @property
    def is_compileable(self) -> bool:
        """Whether transformers may compile the decoding steps. Its layers appear at the first forward, after
        generate() asks, so before that the cache answers what it was built with: `convert` builds generate's
        cache with compileable=True when it converted every layer (the full and sliding KV caches of layers left
        unconverted grow or shift, and would recompile each step)."""
        if not self.layers:
            return self.compileable
        return all(layer.is_compileable for layer in self.layers)

    def layer(self, layer_idx: int, converted: bool = True, sliding_window: int | None = None
              ) -> SparseKLayer | FullKVLayer | SlidingKVLayer:
        """The cache of layer `layer_idx`, made on first use (by the pre-hooks, in layer order): a SparseKLayer
        for a converted layer, else a SlidingKVLayer(sliding_window) or, with no sliding_window, a FullKVLayer."""
        if converted:
            make, what = SparseKLayer, "converted"
        elif sliding_window is None:
            make, what = FullKVLayer, "left unconverted"
        else:
            make = functools.partial(SlidingKVLayer, sliding_window)
            what = f"left unconverted with a sliding window of {sliding_window}"
        while len(self.layers) <= layer_idx:
            self.layers.append(make())
        layer = self.layers[layer_idx]
        kind = SparseKLayer if converted else FullKVLayer if sliding_window is None else SlidingKVLayer
        if not isinstance(layer, kind) or getattr(layer, "sliding_window", sliding_window) != sliding_window:
            raise ValueError(f"this SparseKHFCache holds a {type(layer).__name__} for layer {layer_idx}, which the "
                             f"model {what}: it was filled by another model; use a new cache")
        return layer

    def kv_bytes(self) -> int:
        """Bytes of cached keys and values over all layers (converted, sliding-window and full)."""
        return sum(layer.kv_bytes() for layer in self.layers)


def padding_mask(attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """A transformers attention-mask function (AttentionMaskInterface), called once per forward: it passes on
    the 2D [B, kv_len] padding mask (1 = real token) or None as it came, for attention functions that apply
    causality (and any window) themselves, as SparseK's, the peers' and the distillation teacher's do."""
    return attention_mask


def _real_tokens(mask: Tensor | None, n: int) -> Tensor | None:
    """The 2D padding mask's last n columns as bool [B, n]; None when there is no mask or no padding in them."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"SparseK attention takes a 2D [B, T] padding mask, got shape {tuple(mask.shape)}")
    mask = mask[:, -n:].bool()
    return None if mask.all() else mask


def _left_padded_lengths(mask: Tensor | None, batch: int, t_len: int) -> Tensor | None:
    """Real tokens per row [B] from the mask's last t_len columns; None when there is no padding."""
    mask = _real_tokens(mask, t_len)
    if mask is None:
        return None
    lengths = mask.sum(-1)
    expected = torch.arange(t_len, device=mask.device) >= (t_len - lengths)[:, None]
    if not torch.equal(mask, expected):
        raise ValueError("SparseK attention supports left padding only (each row's real tokens last and "
                         "contiguous); got an attention_mask with padding on the right or inside")
    return lengths


def causal_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, sliding_window: int | None = None) -> Tensor:
    """Exact causal attention, for the layers `convert` leaves alone: query [B, Hq, T, D], key, value [B, H, S, D]
    (S >= T: cached tokens first, then the T new ones), attention_mask [B, >= S] (1 = real token) or None
    -> [B, T, Hq, D]. sliding_window (the model's own, if it has one) keeps the keys of the newest positions
    only, as transformers' masks do. Queries with no real key (left padding) give zeros, like SparseK's."""
    t_len, kv_len = query.shape[2], key.shape[2]
    real = _real_tokens(attention_mask, kv_len)                                 # [B, S] or None
    if real is None and sliding_window is None and t_len == kv_len:
        out = nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                         enable_gqa=True)
        return out.transpose(1, 2)
    k_pos = torch.arange(kv_len, device=query.device)
    q_pos = k_pos[kv_len - t_len:, None]                                        # [T, 1]: columns of the new tokens
    allowed = k_pos <= q_pos                                                    # [T, S]
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    if real is not None:
        allowed = allowed & real[:, None, None, :]                              # [B, 1, T, S]
    # A row with nothing allowed would be NaN in SDPA: let it see everything, then zero it.
    empty = ~allowed.any(-1, keepdim=True)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed | empty, scale=scaling,
                                                     enable_gqa=True)
    return out.masked_fill(empty, 0).transpose(1, 2)


def sparsek_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                              sparsek_scores: Tensor | None = None,
                              sparsek_layer: SparseKLayer | FullKVLayer | SlidingKVLayer | None = None,
                              **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: query [B, Hq, T, D], key, value [B, H, T, D] -> ([B, T, Hq, D], None).

    sparsek_scores [B, T, H] and sparsek_layer come from the pre-hook `convert` installs on converted layers.
    Layers it left unconverted (not in config.sparsek["layers"]) get exact causal attention (within the model's
    sliding_window, if the layer has one) over key, value [B, H, S, D]: what their cache layer returned, all
    tokens so far (FullKVLayer) or the last sliding_window - 1 and the T new ones (SlidingKVLayer).
    """
    # No scores and no record of being left out: the module was never converted.
    settings = getattr(module.config, "sparsek", None)
    unconverted = settings is not None and module.layer_idx not in settings.get("layers", [module.layer_idx])
    if sparsek_scores is None and not unconverted:
        raise ValueError(f"{type(module).__name__} has no SparseK scorer: build the model with sparsek's convert()")
    # Logit soft-capping and sink logits would change the math, so they are refused rather than dropped.
    unsupported = {name: kwargs[name] for name in ("softcap", "s_aux") if kwargs.get(name) is not None}
    if dropout or unsupported:
        raise ValueError(f"SparseK attention does not implement {sorted(unsupported) + ['dropout'] * bool(dropout)}")
    if unconverted:
        sliding_window = kwargs.get("sliding_window")
        if isinstance(sparsek_layer, SlidingKVLayer) and (sliding_window is None
                                                          or sliding_window > sparsek_layer.sliding_window):
            raise ValueError(f"layer {module.layer_idx} attends with sliding_window={sliding_window} but its cache "
                             f"keeps {sparsek_layer.sliding_window - 1} past tokens (from config.layer_types and "
                             "config.sliding_window at convert()): the config does not describe this model")
        return causal_attention(query, key, value, attention_mask, scaling, sliding_window), None
    # A model's own sliding_window is superseded by SparseK's window in converted layers.
    topk, window, gate = settings["topk"], settings["window"], settings["gate"]
    batch, _, t_len, _ = query.shape
    if key.shape[2] != t_len:
        raise ValueError("a converted SparseK model must decode with SparseKHFCache (generate() uses it by "
                         f"default); got {key.shape[2]} cached keys for {t_len} queries from another cache")
    # Under autocast RoPE leaves q and k in float32 (its cos/sin are) while v comes from a bf16 matmul; run all
    # three in the autocast dtype, as SDPA would.
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else value.dtype
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (query, key, value))  # [B, T, heads, D]
    state = sparsek_layer.state if sparsek_layer is not None else None

    if state is not None:                                              # decoding: one token at a time, exact
        # Checked at the first converted layer only, and not in compiled code: the check waits for the GPU (a
        # graph break), and the mask is the same for all layers.
        if (module.layer_idx == settings["layers"][0] and not torch.compiler.is_compiling()
                and _left_padded_lengths(attention_mask, batch, t_len) is not None):
            raise ValueError("padding inside a decoded chunk: new tokens must all be real")
        return attend(q, k, v, sparsek_scores, topk=topk, window=window, gate=gate, scale=scaling, cache=state)[0], None
    out, cache = attend(q, k, v, sparsek_scores, topk=topk, window=window, gate=gate, scale=scaling,
                        lengths=_left_padded_lengths(attention_mask, batch, t_len),
                        build_cache=sparsek_layer is not None)
    if sparsek_layer is not None:
        sparsek_layer.state = cache
        mark_static(cache)
    return out, None


def mark_static(state: SparseKCache) -> None:
    """Tell torch.compile that the state's tensors keep their addresses (on CUDA, outside compiled code): CUDA
    graphs of compiled decoding then update them in place, as they do transformers' StaticCache."""
    if state.keys.is_cuda and not torch.compiler.is_compiling():
        for name in SparseKCache._BUFFERS:
            torch._dynamo.mark_static_address(getattr(state, name))


AttentionInterface.register(IMPLEMENTATION, sparsek_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, padding_mask)


def cache_kwarg(kwargs: dict) -> Cache | None:
    """The cache among an attention module's keyword arguments (as a forward pre-hook sees them), under any of
    the names transformers models use for it (`cache`, `past_key_values`, `layer_past`); None if none."""
    return next((kwargs[name] for name in ("cache", "past_key_values", "layer_past") if name in kwargs), None)


def _score_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Before each attention call: scores from the module's input, and its layer of the SparseK cache."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache = cache_kwarg(kwargs)
    positions = kwargs.get("position_ids")
    if positions is None:  # the models we know pass position_ids; else count from the cache
        start = cache.get_seq_length(module.layer_idx) if isinstance(cache, Cache) else 0
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
    kwargs["sparsek_scores"] = module.sparsek_scorer(hidden, positions)               # [B, T, H] float32
    layer = cache.layer(module.layer_idx) if isinstance(cache, SparseKHFCache) else None
    if layer is not None:
        layer.next_positions = (positions[..., -1:] + 1).expand(hidden.shape[0], 1)
    kwargs["sparsek_layer"] = layer
    return args, kwargs


def _exact_cache_hook(module: nn.Module, args: tuple, kwargs: dict, sliding_window: int | None = None
                      ) -> tuple[tuple, dict]:
    """Before an unconverted layer's attention: its layer of a SparseKHFCache keeps the last sliding_window - 1
    keys and values (a sliding-window layer, as `convert` read from the config) or every one (sliding_window None).
    """
    cache = cache_kwarg(kwargs)
    if isinstance(cache, SparseKHFCache):
        kwargs["sparsek_layer"] = cache.layer(module.layer_idx, converted=False, sliding_window=sliding_window)
    return args, kwargs


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules of the transformers 5 kind: a layer_idx, a config, a name ending in Attention.
    Raises ValueError when the model has none."""
    found = [m for m in model.modules()
             if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "config")]
    if not found:
        raise ValueError(f"no transformers attention modules found in {type(model).__name__}")
    return found


def _layer_types(model: PreTrainedModel) -> list[str] | None:
    """config.layer_types ("full_attention", "sliding_attention", ... per layer) of the (text) model, if any."""
    return getattr(model.config.get_text_config(), "layer_types", None)


def _sliding_windows(model: PreTrainedModel) -> dict[int, int]:
    """{layer index: window} for the layers config.layer_types marks "sliding_attention" (config.sliding_window)."""
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if window is None:
        return {}
    return {i: window for i, kind in enumerate(_layer_types(model) or []) if kind == "sliding_attention"}


def _layer_indices(layers: Sequence[int] | str | None, modules: list[nn.Module], model: PreTrainedModel
                   ) -> list[int]:
    """`convert`'s layers checked against the model's attention modules, sorted; None means all of them,
    "global" those that config.layer_types marks "full_attention"."""
    available = sorted(module.layer_idx for module in modules)
    if layers is None:
        return available
    if isinstance(layers, str) and layers == "global":
        layer_types = _layer_types(model)
        if not layer_types:
            raise ValueError(f'layers="global" converts the layers that config.layer_types marks "full_attention", '
                             f"but {type(model).__name__}'s config has no layer_types: pass layer indices instead")
        layers = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        if not layers:
            raise ValueError(f'layers="global": config.layer_types has no "full_attention" layer: {layer_types}')
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError(f'layers must be a sequence of layer indices, "global" or None (all), got {layers!r}')
    if not layers:
        raise ValueError("layers is empty: name at least one layer to convert (or None for all)")
    wrong = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i not in available]
    if wrong:
        raise ValueError(f"layers must be attention layer indices from 0 to {available[-1]}, got {wrong}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has duplicates: {list(layers)}")
    return sorted(int(i) for i in layers)


_ABSENT = object()


class _Undo:
    """What `convert` changed in a model, to put back if it fails part-way: hooks, scorers, config.sparsek, the
    attention implementation and the generation-cache wrapper (instance attributes)."""

    ATTRIBUTES = ("generation_cache_factory", "_prepare_cache_for_generation")

    def __init__(self, model: PreTrainedModel):
        self.model, self.hooks, self.scorers = model, [], []
        self.attn_implementation = model.config._attn_implementation
        self.settings = vars(model.config).get("sparsek", _ABSENT)
        self.attributes = {name: vars(model).get(name, _ABSENT) for name in self.ATTRIBUTES}

    def __call__(self) -> None:
        model = self.model
        for handle in self.hooks:
            handle.remove()
        for module in self.scorers:
            del module.sparsek_scorer
        if self.settings is _ABSENT:
            vars(model.config).pop("sparsek", None)
        else:
            model.config.sparsek = self.settings
        for name, value in self.attributes.items():
            if value is _ABSENT:
                vars(model).pop(name, None)
            else:
                vars(model)[name] = value
        if model.config._attn_implementation != self.attn_implementation:
            model.set_attn_implementation(self.attn_implementation)


def convert(model: PreTrainedModel, *, topk: int, window: int, slope: float = SLOPE_CONVERT, gate: str = "kv",
            layers: Sequence[int] | str | None = None, sinks: int = 0) -> PreTrainedModel:
    """Turn a transformers causal LM into SparseK attention, in place; returns the model.

    Each attention module of `layers` (indices as in module.layer_idx; None = all; "global" = the layers
    config.layer_types marks "full_attention", e.g. Gemma 3's every sixth) gets a `sparsek_scorer`
    (float32, zero weight, so the model starts from pure recency: the selection is the topk newest tokens
    before the window). With slope >= 1 that selection is hard (mask exactly 0 or 1): fine for using the model
    untrained, but the zero scorer then gets no gradient at all. To fine-tune, use slope < 1 (the mask then ramps
    over about 1 / slope keys at the threshold; `sparsek finetune` uses 0.1). The other layers keep exact causal
    attention (within their sliding window, if they have one) and, in a SparseKHFCache, a KV cache of the last
    sliding_window - 1 tokens for the layers config.layer_types marks "sliding_attention", a full one for the
    rest. sinks > 0 gives each scorer a learned bias for the first `sinks` positions (layers.Scorer; zero until
    distilled). The settings, the sorted layer indices included, go into `model.config.sparsek`, so
    `save_pretrained` records them; reload with `sparsek.integrations.hf.load`. Raises ValueError for a model or
    settings it cannot convert, and leaves the model as it was on any failure.
    """
    # Everything is checked before the model changes, and a failure part-way is undone: a failed convert leaves
    # the model as it was (a retry would otherwise find it "already converted").
    check_budget(topk, window)
    if isinstance(slope, bool) or not isinstance(slope, numbers.Real) or not math.isfinite(slope):
        raise ValueError(f"slope must be a finite number, got {slope!r}")
    check_gate(gate)
    check_sinks(sinks, topk)
    modules = attention_modules(model)
    if any(hasattr(module, "sparsek_scorer") for module in modules):
        raise ValueError("model is already converted to SparseK")
    bidirectional = sorted(module.layer_idx for module in modules if getattr(module, "is_causal", True) is False)
    if bidirectional:  # e.g. Gemma 3 with use_bidirectional_attention (EmbeddingGemma): not a causal LM
        raise ValueError(f"layers {bidirectional} attend bidirectionally; SparseK attention (and the exact "
                         "attention of unconverted layers) is causal")
    converted = _layer_indices(layers, modules, model)
    if not callable(getattr(model, "_prepare_cache_for_generation", None)):  # e.g. BertForMaskedLM, LlamaModel
        raise ValueError(f"{type(model).__name__} is not a transformers causal LM that generates: convert one built "
                         "with AutoModelForCausalLM")
    sliding = _sliding_windows(model)
    config = model.config
    n_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    undo = _Undo(model)
    try:
        for module in modules:
            if module.layer_idx not in converted:
                hook = functools.partial(_exact_cache_hook, sliding_window=sliding.get(module.layer_idx))
                undo.hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                continue
            device = next(module.parameters()).device  # each layer's own device (models split over GPUs)
            module.sparsek_scorer = Scorer(config.hidden_size, n_kv_heads, slope, sinks).to(device)
            undo.scorers.append(module)
            undo.hooks.append(module.register_forward_pre_hook(_score_hook, with_kwargs=True))
        config.sparsek = {"topk": topk, "window": window, "slope": float(slope), "gate": gate, "layers": converted,
                          "sinks": sinks}
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:  # transformers only warns for such models
            raise ValueError(f"{type(model).__name__} kept attention {model.config._attn_implementation!r}: its "
                             "attention does not dispatch through transformers' AttentionInterface")
        every_layer = len(converted) == len(modules)
        default_generation_cache(model, functools.partial(SparseKHFCache, compileable=every_layer))
    except BaseException:
        undo()
        raise
    return model


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which the model's forward takes its cache: `cache` from transformers 5.24 on (where
    `past_key_values` is a deprecated alias), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def default_generation_cache(model: PreTrainedModel, make_cache: Callable[[], Cache]) -> None:
    """Make generate() build make_cache() (e.g. SparseKHFCache or PeerCache) when the caller passes no cache and
    use_cache is not False, instead of transformers' DynamicCache, by wrapping the model's
    _prepare_cache_for_generation. The wrapper is installed once per model (model.generation_cache_factory
    records it); a later call only changes the cache it builds."""
    installed = getattr(model, "generation_cache_factory", None) is not None
    model.generation_cache_factory = make_cache
    if installed:
        return
    prepare, name = model._prepare_cache_for_generation, cache_argument(model)

    def prepare_with_default(generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(name) is None and generation_config.use_cache is not False:
            model_kwargs[name] = model.generation_cache_factory()
        return prepare(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = prepare_with_default


def load(path: str | Path, **from_pretrained_kwargs) -> PreTrainedModel:
    """A converted model saved with `save_pretrained`: base weights, SparseK settings and scorer weights.

    (Plain `from_pretrained` of such a folder raises, once this module is imported: it would drop the scorers.)"""
    path = Path(path)
    settings = getattr(AutoConfig.from_pretrained(path), "sparsek", None)
    if not settings:
        raise ValueError(f"{path} holds no SparseK model (config.json has no 'sparsek' settings)")
    check_safetensors_folder(path)  # transformers' own error would not say which file is damaged
    from_pretrained_kwargs.setdefault("attn_implementation", "sdpa")  # switched to sparsek by convert
    token = _loading.set(True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **from_pretrained_kwargs)
    finally:
        _loading.reset(token)
    # Configs saved before partial conversion have no "layers": all layers were converted (convert's default).
    convert(model, **{name: settings[name] for name in SETTINGS if name in settings})
    scorer_state = {}
    for file in sorted(path.glob("*.safetensors")):
        scorer_state.update({k: t for k, t in load_safetensors(file).items() if ".sparsek_scorer." in k})
    wanted = {k for k in model.state_dict() if ".sparsek_scorer." in k}
    if set(scorer_state) != wanted:
        raise ValueError(f"{path}: scorer weights missing or unexpected: {sorted(wanted ^ set(scorer_state))[:4]}")
    model.load_state_dict(scorer_state, strict=False)
    unexplained = set(info["unexpected_keys"]) - wanted
    if unexplained or info["missing_keys"]:
        raise ValueError(f"{path}: weights do not match the model: missing {info['missing_keys'][:4]}, "
                         f"unexpected {sorted(unexplained)[:4]}")
    return model


_loading = contextvars.ContextVar("sparsek_loading", default=False)  # True while `load` builds a model


def _checked_post_init(post_init: Callable) -> Callable:
    """PreTrainedModel.post_init (the end of every transformers model's __init__), refusing a config with SparseK
    settings (config.sparsek, as save_pretrained records them) outside `load`: the model transformers builds has
    no scorers, so from_pretrained would drop their weights and give the original model without a word. Inside
    `load`, the scorer keys are left out of transformers' load report: `load` puts them in itself."""

    @functools.wraps(post_init)
    def checked(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        if not getattr(self.config, "sparsek", None):
            return
        if not _loading.get():
            raise ValueError("this config holds SparseK settings (config.sparsek), but transformers builds the "
                             "model without its SparseK scorers and would drop their weights: load a saved SparseK "
                             "model with sparsek.integrations.hf.load(path) (or delete config.sparsek to build the "
                             "original model)")
        ignored = set(self._keys_to_ignore_on_load_unexpected or ())
        self._keys_to_ignore_on_load_unexpected = ignored | {r"\.sparsek_scorer\."}

    checked.sparsek_checked = True
    return checked


if not getattr(PreTrainedModel.post_init, "sparsek_checked", False):  # once, even if this module is reloaded
    PreTrainedModel.post_init = _checked_post_init(PreTrainedModel.post_init)


class GraphedDecoder:
    """Decode steps of a converted model replayed from one CUDA graph: one launch per token instead of
    hundreds, which is what makes decoding fast when the model is small (see `python -m sparsek.bench.decode`).

        cache = SparseKHFCache()
        model(prompt_ids, attention_mask=mask, past_key_values=cache)   # prefill, as usual
        decoder = GraphedDecoder(model, cache)
        logits = decoder(next_ids)                                       # [B, 1] -> [B, vocab], each step

    Rows continue at their own positions (left padding allowed). Every tensor of a SparseK cache keeps its
    size and address, so the graph replays for as many steps as wanted. Needs CUDA tensors, and every layer
    converted: the KV cache of a layer left out by `convert(layers=...)` is new tensors each step
    (concatenated; full, or a sliding window), which a replayed graph cannot follow. So a model converted with
    layers="global" (Gemma 3) decodes eagerly.
    """

    def __init__(self, model: PreTrainedModel, cache: SparseKHFCache):
        if any(not isinstance(layer, SparseKLayer) for layer in cache.layers):
            raise ValueError("GraphedDecoder decodes fully converted models only; this one has unconverted layers "
                             "(convert(layers=...)), whose KV cache (full or sliding window) is re-allocated each "
                             "step, which a CUDA graph cannot replay")
        states = [layer.state for layer in cache.layers]
        if not states or any(s is None for s in states) or not states[0].keys.is_cuda:
            raise ValueError("GraphedDecoder needs a SparseKHFCache after a prefill on a CUDA device")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(states[0].batch, 1, dtype=torch.long, device=states[0].keys.device)
        self.positions = cache.layers[0].next_positions.clone()   # where the prefill's position_ids left off
        saved = [copy.deepcopy(state) for state in states]
        seen = [layer.seen for layer in cache.layers]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():  # compiles kernels, allocates workspaces
                self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self._restore(states, saved, seen)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.logits = self._step()
        finally:
            self._restore(states, saved, seen)            # the warm-up step ran; capture moved the layers' counts

    def _step(self) -> Tensor:
        out = self.model(self.tokens, position_ids=self.positions, use_cache=True, logits_to_keep=1,
                         **{cache_argument(self.model): self.cache})
        return out.logits[:, -1]

    def _restore(self, states, saved, seen) -> None:
        for state, old, layer, n in zip(states, saved, self.cache.layers, seen):
            state.copy_(old)
            layer.seen = n

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens [B, 1] (the newest token of each row) -> next-token logits [B, vocab] (a fresh tensor)."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.positions += 1
        for layer in self.cache.layers:
            layer.seen += 1
        return self.logits.clone()
