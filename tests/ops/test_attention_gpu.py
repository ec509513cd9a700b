"""GPU checks of the fused kernels at real sizes in bf16, and torch.compile without graph breaks.

Criterion (flash-attention's idiom): against a float32 reference computed from the same bf16 inputs, the
kernels' error stays within 2x the error of the same math done in PyTorch bf16, for the output and for all
four gradients; never NaN. Skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA device (and TRITON_INTERPRET unset)", allow_module_level=True)

from sparsek import SparseKAttention, SparseKConfig  # noqa: E402
from sparsek.ops.attention import fused  # noqa: E402
from sparsek.ops.attention.reference import sparsek_attention_reference  # noqa: E402


def run(fn, inputs, cotangent, **kwargs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, cotangent.to(out.dtype), allow_unused=True)
    return [out, *grads]


@pytest.mark.parametrize("backend", ["triton", "gluon"])    # the forward kernel: tl or Gluon (sm_90)
@pytest.mark.parametrize("t_len,hq,hk,gate,d", [
    (4096, 4, 4, "kv", 128), (8191, 8, 2, "kv", 128), (16384, 2, 2, "v", 128), (32768, 2, 1, "kv", 128),
    (4096, 4, 4, "none", 128),
    (8192, 4, 1, "kv", 256), (16384, 4, 1, "kv", 256),   # Gemma 3 270M's global layers: 4 / 1 heads of dim 256
])
def test_bf16_error_within_twice_pytorch_bf16(t_len, hq, hk, gate, d, backend):
    torch.manual_seed(t_len)
    topk, window = 1024, 512
    q = torch.randn(1, t_len, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t_len, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, t_len, hk, d, device="cuda", dtype=torch.bfloat16)
    scores = torch.randn(1, t_len, hk, device="cuda") + 1e-3 * torch.arange(t_len, device="cuda")[:, None]
    cotangent = torch.randn(1, t_len, hq, d, device="cuda")
    kwargs = dict(topk=topk, window=window, gate=gate)
    if backend == "gluon":
        from sparsek.ops.attention import gluon
        if gluon.cannot_run(q):
            pytest.skip(f"the Gluon forward cannot run: {gluon.cannot_run(q)}")

    fused.POISON_OUTPUTS = True
    try:
        got = run(fused.sparsek_attention_fused, [q, k, v, scores], cotangent, backend=backend, **kwargs)
    finally:
        fused.POISON_OUTPUTS = False
    exact = run(sparsek_attention_reference, [q.float(), k.float(), v.float(), scores], cotangent, **kwargs)
    plain = run(lambda *a, **kw: sparsek_attention_reference(*a, upcast=False, **kw), [q, k, v, scores],
                cotangent, **kwargs)
    for name, g, w, p in zip(["out", "dq", "dk", "dv", "dscores"], got, exact, plain):
        if name == "dscores" and gate == "none":
            continue
        assert not torch.isnan(g).any(), f"{name}: NaN"
        err = (g.float() - w.float()).abs().max().item()
        err_plain = (p.float() - w.float()).abs().max().item()
        print(f"T={t_len} {name}: kernel {err:.3e}  pytorch-bf16 {err_plain:.3e}")
        assert err <= 2 * err_plain + 1e-5, f"{name}: kernel error {err} > 2 x PyTorch bf16 error {err_plain}"


def test_compile_has_no_graph_break():
    layer = SparseKAttention(SparseKConfig(d_model=256, n_heads=4, n_kv_heads=2, topk=64, window=32)).cuda()
    x = torch.randn(2, 512, 256, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: any graph break is an error
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer(x), atol=2e-3, rtol=2e-3)
    assert layer.scorer.weight.grad is not None
