"""The Gluon forward against the tl forward on one GPU: forward alone over tuning configs, and forward + backward
through each backend.

    python -m sparsek.bench.gluon                                      # 16/16 at 8k, 32k, 128k and 64/4 at 32k
    python -m sparsek.bench.gluon --configs 64x3,32x3/64,64x3+ws --shapes 16/16@32768
    python -m sparsek.bench.gluon --dq-configs "" --list        # also the list pass, tl against Gluon

Both forwards run on the same selection (topk 1024 + window 512 by default, D = 128, bf16, gate "kv", B = 1).
A config is `keys x stages[/rows][+ws]`: keys per tile, shared-memory ring stages, query rows per program (the
lists' block of 128 when left out; 64 splits each block between two programs) and, with +ws, a producer
partition of 4 warps that fills the ring (`gl.warp_specialize`); "default" is `tiles.gluon_forward`'s. Each
Gluon row says how far its output lies from the tl forward's (max |difference|; about one bf16 rounding step
is expected). The dq rows time the backward's dq pass the same way: the tl kernel against Gluon configs
(`--dq-configs`), on the tl forward's output, with max |dq - tl|. On each tl row, "f+b" is
`sparsek_attention_fused` forward + backward with backend "triton" (the tl forward and dq pass) and "gluon"
(the Gluon forward and dq pass in their default configs); the list and band passes are the same.
Medians of `triton.testing.do_bench` in ms, TF/s the effective rate: 4 T (topk + window) D Hq / time for the
forward, 6 T (topk + window) D Hq for the dq pass;
the table is printed last, and every row goes to <out>/results.json as it is measured. Needs an sm_90 GPU
and Triton 3.6.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from sparsek.ops.attention import fused, gluon
from sparsek.ops.common import tiles


def parse_config(text: str) -> dict:
    """"default" -> {} (`tiles.gluon_forward`'s config); "64x3" -> keys_per_tile 64, stages 3; "32x3/64" also
    rows 64; a "+ws" suffix adds a producer partition of 4 warps."""
    if text == "default":
        return {}
    text, ws, _ = text.partition("+ws")
    tile, _, rows = text.partition("/")
    keys, stages = tile.split("x")
    return dict(keys_per_tile=int(keys), stages=int(stages), rows=int(rows) if rows else None,
                producer_warps=4 if ws else 0)


def parse_shape(text: str) -> tuple[int, int, int]:
    """"16/16@32768" -> (16 query heads, 16 KV heads, T = 32768)."""
    heads, t_len = text.split("@")
    hq, hk = heads.split("/")
    return int(hq), int(hk), int(t_len)


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_shape(hq: int, hk: int, t_len: int, configs: list[str], args) -> list[dict]:
    torch.manual_seed(0)
    d = args.head_dim
    q = torch.randn(1, t_len, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, t_len, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scores = torch.randn(1, t_len, hk, device="cuda")
    u = fused.score_rows(scores)
    block = tiles.forward(tiles.target(q.device), d)["BLOCK_M"]
    tau, start, end, lists, poison = fused.forward_selection((u,), (args.topk, args.window, block))
    inputs = (q, k, v, u, tau, start, end, lists, poison, args.window, "kv", d ** -0.5)
    flop = 4 * t_len * (args.topk + min(args.window, t_len)) * d * hq
    shape = f"{hq}/{hk}"
    o_tl, _ = fused.fused_forward(*inputs)
    rows = [dict(shape=shape, T=t_len, kernel="tl", ms=ms(lambda: fused.fused_forward(*inputs)), err=0.0)]
    for config in configs:
        options = parse_config(config)
        o, _ = gluon.fused_forward_gluon(*inputs, **options)
        err = (o.float() - o_tl.float()).abs().max().item()
        rows.append(dict(shape=shape, T=t_len, kernel=f"gluon {config}", err=err,
                         ms=ms(lambda options=options: gluon.fused_forward_gluon(*inputs, **options))))
    for row in rows:
        row["tflops"] = flop / row["ms"] / 1e9

    # The dq pass, tl against the Gluon configs, on the tl forward's o and lse.
    o, lse = fused.fused_forward(*inputs)
    do = torch.randn_like(q)
    dq_args = (do, q, k, v, o, lse, u, tau, start, end, lists, min(args.window, t_len), "kv", d ** -0.5)
    dq_tl = fused.dq_pass(*dq_args)[0]
    dq_flop = flop * 3 // 2                            # Q K^T, dO V^T and dS K over the same pairs
    dq_rows = [dict(shape=shape, T=t_len, kernel="dq tl", ms=ms(lambda: fused.dq_pass(*dq_args)), err=0.0)]
    for config in args.dq_configs.split(",") if args.dq_configs else []:
        options = parse_config(config)
        dq = gluon.dq_pass_gluon(*dq_args, **options)[0]
        dq_rows.append(dict(shape=shape, T=t_len, kernel=f"dq gluon {config}",
                            err=(dq.float() - dq_tl.float()).abs().max().item(),
                            ms=ms(lambda options=options: gluon.dq_pass_gluon(*dq_args, **options))))
    for row in dq_rows:
        row["tflops"] = dq_flop / row["ms"] / 1e9
    rows += dq_rows

    # The list pass, tl against Gluon (default config), on the same delta; max |dk - tl| over listed keys.
    if tiles.gluon_list(tiles.SM90, d) is not None and args.list:
        _, _, delta = fused.dq_pass(*dq_args)
        list_args = (do, q, k, v, lse, delta, u, tau, end, lists, args.topk, min(args.window, t_len), "kv", d ** -0.5)
        dk_tl = fused.list_pass(*list_args)[0]
        listed = dk_tl.abs().sum(-1) > 0
        dk_gl = gluon.list_pass_gluon(*list_args)[0]
        list_flop = 8 * t_len * min(args.topk, t_len) * d * hq      # 4 products over the selected pairs
        for kernel, fn, err in (
                ("list tl", lambda: fused.list_pass(*list_args), 0.0),
                ("list gluon", lambda: gluon.list_pass_gluon(*list_args),
                 (dk_gl[listed] - dk_tl[listed]).abs().max().item())):
            t = ms(fn)
            rows.append(dict(shape=shape, T=t_len, kernel=kernel, ms=t, err=err, tflops=list_flop / t / 1e9))

    grads = [x.clone().requires_grad_() for x in (q, k, v, scores)]
    cotangent = torch.randn_like(q)

    def forward_backward(backend):
        o = fused.sparsek_attention_fused(*grads, topk=args.topk, window=args.window, backend=backend)
        torch.autograd.grad(o, grads, cotangent)

    rows[0]["fb_tl"] = ms(lambda: forward_backward("triton"))
    rows[0]["fb_gluon"] = ms(lambda: forward_backward("gluon"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="16/16@8192,16/16@32768,16/16@131072,64/4@32768",
                        help="comma-separated Hq/Hk@T")
    parser.add_argument("--configs", default="default,64x2,32x3/64,64x3+ws,64x2+ws,32x4+ws,32x3/64+ws",
                        help="comma-separated keys x stages[/rows][+ws], or default (tiles.gluon_forward)")
    parser.add_argument("--dq-configs", default="default,64x3,32x3+ws,64x2/64",
                        help="the same for the dq pass (tiles.gluon_dq's default); empty: no dq rows")
    parser.add_argument("--list", action="store_true", help="also time the list pass, tl against Gluon")
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_gluon"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gluon needs a CUDA GPU")
    problem = gluon.cannot_run(torch.empty(1, 1, 1, args.head_dim, device="cuda", dtype=torch.bfloat16))
    if problem:
        raise SystemExit(f"bench.gluon: the Gluon forward cannot run here: {problem}")
    configs = args.configs.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        rows += bench_shape(*parse_shape(shape), configs, args)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"[{shape}] done", flush=True)

    print(f"\n{torch.cuda.get_device_name()}, triton {triton.__version__}; topk {args.topk} + window {args.window}, "
          f"D {args.head_dim}, bf16, gate kv, median ms; f+b: sparsek_attention_fused, tl / Gluon forward and dq")
    print(f"{'heads':>6} {'T':>7} {'kernel':>20} {'ms':>8} {'TF/s':>6} {'max |x - tl|':>12} {'f+b tl':>8} "
          f"{'f+b gluon':>9}")
    for r in rows:
        fb = f"{r['fb_tl']:8.3f} {r['fb_gluon']:9.3f}" if "fb_tl" in r else ""
        print(f"{r['shape']:>6} {r['T']:>7} {r['kernel']:>20} {r['ms']:8.3f} {r['tflops']:6.0f} {r['err']:12.2e} {fb}")


if __name__ == "__main__":
    main()
