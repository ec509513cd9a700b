"""Run folders: model and optimizer tensors in safetensors, everything else in one JSON state.

    run/
      model.safetensors       weights (and buffers such as hash rotations)
      optimizer.safetensors   AdamW moments, keyed "<param index>.<name>"
      state.json              {"step", "tokens", "train": TrainConfig, "model": LMConfig, "param_groups", ...}
      metrics.jsonl           one JSON object per logged step or evaluation

Each file is written to a temporary name and renamed, so a run stopped mid-save keeps its previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, METRICS_FILE = (
    "model.safetensors", "optimizer.safetensors", "state.json", "metrics.jsonl")


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Write model (its state_dict, or the given named tensors), optimizer and `state` (JSON-serialisable)
    into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    named = model if isinstance(model, dict) else model.state_dict()
    tensors = {name: t.detach().contiguous().cpu() for name, t in named.items()}
    _atomic(run_dir / MODEL_FILE, lambda path: save_file(tensors, path))
    state = dict(state)
    if optimizer is not None:
        saved = optimizer.state_dict()
        moments = {f"{index}.{name}": torch.as_tensor(value).cpu()
                   for index, entries in saved["state"].items() for name, value in entries.items()}
        _atomic(run_dir / OPTIMIZER_FILE, lambda path: save_file(moments, path))
        state["param_groups"] = saved["param_groups"]
    save_state(run_dir, state)


def save_state(run_dir: str | Path, state: dict) -> None:
    """Write state.json alone (runs whose weights are saved another way, e.g. save_pretrained)."""
    _atomic(Path(run_dir) / STATE_FILE, lambda path: Path(path).write_text(json.dumps(state, indent=1)))


def load_state(run_dir: str | Path) -> dict:
    """The JSON state of a run folder."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (missing {STATE_FILE})")
    return json.loads(path.read_text())


def changed_settings(saved, config, resumable: tuple[str, ...]) -> list[str]:
    """Names of the fields where config (a dataclass) differs from saved (the same class, from a checkpoint),
    the `resumable` ones aside: what a resumed run must refuse."""
    return [f.name for f in dataclasses.fields(config)
            if f.name not in resumable and getattr(saved, f.name) != getattr(config, f.name)]


def load_tensors(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, by name (on the CPU)."""
    return load_file(Path(run_dir) / MODEL_FILE)


def load_weights(run_dir: str | Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into `model` (strict: every tensor must match)."""
    model.load_state_dict(load_tensors(run_dir), strict=True)


def load_optimizer(run_dir: str | Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore the optimizer saved by `save_checkpoint` (moments onto the parameters' devices)."""
    moments = load_file(Path(run_dir) / OPTIMIZER_FILE)
    entries: dict[int, dict] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})


def append_metrics(run_dir: str | Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as file:
        file.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _atomic(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(str(temporary))
    os.replace(temporary, path)


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records logged after `step` (a resumed run logs those steps again)."""
    records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    _atomic(Path(run_dir) / METRICS_FILE,
            lambda path: Path(path).write_text("".join(json.dumps(r) + "\n" for r in records)))
