"""Bad shapes and sizes given to the layer and the attention entry point raise ValueError naming the argument
(they used to raise ZeroDivisionError or an unpacking error)."""

from __future__ import annotations

import pytest
import torch

from sparsek import SparseKAttention, SparseKConfig, sparsek_attention


@pytest.mark.parametrize("kwargs,name", [
    (dict(d_model=64, n_heads=0), "n_heads"), (dict(d_model=64, n_heads=4, n_kv_heads=0), "n_kv_heads"),
    (dict(d_model=0, n_heads=4), "d_model"), (dict(d_model=64, n_heads=4, head_dim=0), "head_dim"),
    (dict(d_model=64, n_heads=4.0), "n_heads"),
])
def test_config_sizes_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be an integer >= 1"):
        SparseKConfig(topk=4, window=4, **kwargs)


@pytest.mark.parametrize("name,value", [("topk", 4.0), ("topk", True), ("topk", "4"), ("window", -1),
                                        ("window", 2.5)])
def test_config_budget_names_the_argument(name, value):
    """topk and window are checked when the config is made (a float topk used to pass and fail in the forward)."""
    with pytest.raises(ValueError, match=f"^{name} must be an int >= 0, got {value!r}"):
        SparseKConfig(d_model=64, n_heads=4, **{"topk": 4, "window": 4, name: value})


def test_config_budget_not_both_zero():
    with pytest.raises(ValueError, match="topk and window must be not both 0"):
        SparseKConfig(d_model=64, n_heads=4, topk=0, window=0)


@pytest.mark.parametrize("shape", [(10, 64), (1, 10, 32), (1, 1, 10, 64)])
def test_layer_input_must_be_batch_time_model(shape):
    layer = SparseKAttention(SparseKConfig(d_model=64, n_heads=4, n_kv_heads=2, topk=4, window=4))
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model=64\]"):
        layer(torch.randn(shape))


def test_head_dim_zero_is_named():
    q, k = torch.randn(1, 8, 2, 0), torch.randn(1, 8, 2, 0)
    with pytest.raises(ValueError, match="head dim D must be >= 1"):
        sparsek_attention(q, k, k, torch.randn(1, 8, 2), topk=2, window=2)
