"""The experiment behind "A sink in one layer only" in docs/longrange.md (issue 20, run on one H200).

Gemma 3 270M with its global layers (5, 11, 17) at topk 512 + window 512 and the scorers that
`python -m sparsek.eval.farcontext ... --distill-context 16384` saved (scorers_max_lookup1_ctx16384.pt, sharpened by
20 as in the farcontext rows). Position 0 (BOS) is forced into the selection of the chosen layers by a fixed
scorer bias of 5000; nothing is trained. Passkey at 36 examples per depth and held-out perplexity at 8k.

    python docs/longrange/sink_per_layer.py RUN_DIR CACHE_DIR TOKENIZER_DIR 11 17 5 5,17
"""
import json
import sys
import time
from pathlib import Path

import torch

from sparsek.eval.ruler import evaluate_suite
from sparsek.heldout import TransformersLM, evaluate
from sparsek.integrations.hf import convert
from sparsek.integrations.pretrained import bos_token_id, load_pretrained, with_bos
from sparsek.train.distill import parse_layers
from sparsek.train.finetune import FinetuneConfig, tokenized_corpus

run_dir, cache_dir, tokenizer_dir, *variants = sys.argv[1:]      # variants: "5", "5,17", "none", ...
model, tokenizer = load_pretrained("gemma3", dtype=torch.bfloat16, device=torch.device("cuda"), cache_dir=cache_dir,
                                   tokenizer=tokenizer_dir)
_, heldout = tokenized_corpus(FinetuneConfig(data="shakespeare"), tokenizer)
# As farcontext converts (slope 0 for distilled scorers); sinks=1 gives every scorer a bias for BOS.
convert(model, topk=512, window=512, slope=0.0, layers=parse_layers("global"), sinks=1)
named = [(n, m) for n, m in model.named_modules() if n.endswith("sparsek_scorer")]
layer_of = [int(n.split("layers.")[1].split(".")[0]) for n, _ in named]
for (_, scorer), state in zip(named, torch.load(Path(run_dir) / "scorers_max_lookup1_ctx16384.pt")):
    scorer.load_state_dict(state, strict=False)                  # distilled without sinks: the bias stays 0
    scorer.weight.data.mul_(20.0)
net = with_bos(model, bos_token_id(model, tokenizer))
out = Path(run_dir) / "sink_per_layer.json"
results = json.loads(out.read_text()) if out.is_file() else {}
for variant in variants:
    forced = [] if variant == "none" else [int(x) for x in variant.split(",")]
    for layer, (_, scorer) in zip(layer_of, named):
        scorer.sink_bias.data.fill_(5000.0 if layer in forced else 0.0)
    started, row = time.time(), {"forced": forced}
    for context in (4096, 8192, 16384):
        suite = evaluate_suite(net, heldout, lambda t: tokenizer.encode(t, add_special_tokens=False),
                               length=context, tasks=["passkey"], examples=36, batch_size=4,
                               autocast_dtype=torch.bfloat16)
        row[context] = [round(cell["accuracy"] * 36) for cell in suite["passkey"]]
    row["ppl"] = evaluate(TransformersLM(net), heldout, 8192, batch_size=1, max_tokens=16384,
                          autocast_dtype=torch.bfloat16)["ppl"]
    results[variant] = row
    out.write_text(json.dumps(results, indent=1))
    print(variant, row, f"{time.time() - started:.0f} s", flush=True)
