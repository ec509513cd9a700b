"""Train several attention variants with the same data, model size, token count and budget, and compare them.

    compare(["sparsek_window", "full"], TrainConfig(...), LMConfig(...), out_dir="runs/compare")

Each variant trains in out_dir/<variant> (resumable: run the same call again after a stop); the table, the
overlaid plots and a sample from the first SparseK variant (decoded with the constant-memory cache) go to out_dir.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..data.corpus import ByteTokenizer
from ..models import VARIANTS, LMConfig, TransformerLM
from . import checkpoint
from .distributed import World
from .loop import TrainConfig, resolve_device, train


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> TransformerLM:
    """The trained model of a run folder, in eval mode."""
    state = checkpoint.load_state(run_dir)
    model = TransformerLM(LMConfig(**state["model"]))
    checkpoint.load_weights(run_dir, model)
    return model.to(device).eval()


def compare(variants: list[str], config: TrainConfig, model_config: LMConfig, out_dir: str | Path,
            prompt: str = "HAMLET.\n", sample_tokens: int = 300) -> list[dict]:
    """Train (or resume) every variant, then write out_dir/results.json, results.md, loss.png, position.png.

    Returns one row per variant: attention, parameters, tokens, held-out loss and perplexity, tokens/s.
    Variants that stopped early (max_minutes) are reported as unfinished.
    """
    out_dir = Path(out_dir)
    rows = []
    for variant in variants:
        run_config = dataclasses.replace(config, run_dir=str(out_dir / variant))
        if _already_trained(run_config):     # its row (tokens/s included) is that earlier run's, not this code's
            print(f"{variant}: {run_config.run_dir} already holds a finished run, reported as it was; pass "
                  f"--overwrite (or another --out-dir) to train it again")
        summary = train(run_config, dataclasses.replace(model_config, attention=variant))
        rows.append({"attention": variant, **{k: v for k, v in summary.items() if k != "loss_by_position"}})
    finished = [row["attention"] for row in rows if row.get("finished")]
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    table = format_table(rows, model_config)
    (out_dir / "results.md").write_text(table + "\n")
    print(table)
    if finished:
        try:
            from .plots import plot_runs
        except ImportError as error:
            print(f"no plots ({error}): pip install 'sparsek[training]'")
        else:
            plot_runs([out_dir / v for v in finished], out_dir, labels=finished)
    cached = [v for v in finished if VARIANTS[v].sparsek]
    if cached and sample_tokens:
        device = resolve_device(config.device, World())
        model = load_model(out_dir / cached[0], device)
        tokenizer = ByteTokenizer()
        ids = torch.as_tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(config.seed)
        out = model.generate(ids, sample_tokens, temperature=0.8, top_k=40, generator=generator)
        text = tokenizer.decode(out[0].tolist())
        print(f"\nSample from {cached[0]} (constant-memory cache of {sum(model_config.sparsek_budget())} "
              f"keys per layer and head):\n{text}")
        (out_dir / "sample.txt").write_text(text)
    return rows


def _already_trained(config: TrainConfig) -> bool:
    """Whether config.run_dir holds a run that reached config.steps, which train() resumes without training."""
    if config.overwrite or not (Path(config.run_dir) / checkpoint.STATE_FILE).is_file():
        return False
    try:
        return checkpoint.load_state(config.run_dir)["step"] >= config.steps
    except (OSError, ValueError, KeyError):    # a torn or foreign folder: train() says what is wrong with it
        return False


def format_table(rows: list[dict], model_config: LMConfig) -> str:
    """A Markdown table of compare's rows."""
    lines = [f"context {model_config.context}, budget {model_config.budget} keys per query for sparse variants, "
             f"d_model {model_config.d_model}, {model_config.n_layers} layers",
             "",
             "| attention | params | tokens | held-out loss | held-out ppl | train tokens/s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if not row.get("finished"):
            lines.append(f"| {row['attention']} | | {row['tokens']:,} | unfinished (step {row['step']}) | | |")
            continue
        rate = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else ""
        lines.append(f"| {row['attention']} | {row['parameters']:,} | {row['tokens']:,} | {row['eval_loss']:.4f} "
                     f"| {row['eval_ppl']:.3f} | {rate} |")
    return "\n".join(lines)
