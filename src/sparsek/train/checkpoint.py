"""Run folders: model and optimizer tensors in safetensors, everything else in one JSON state.

    run/
      model.safetensors       weights (and buffers such as hash rotations)
      optimizer.safetensors   AdamW moments, keyed "<param index>.<name>"
      state.json              {"step", "tokens", "train": TrainConfig, "model": LMConfig, "param_groups",
                               "checkpoint": {"id", "files"}, ...}
      metrics.jsonl           one JSON object per logged step or evaluation

A checkpoint is all or nothing. `save_checkpoint` writes its three files into a fresh run/.staging/ folder and
commits them with one atomic rename of that folder to run/.committed/; only then are they moved to their places.
A run stopped before the rename keeps its previous checkpoint untouched (the staging folder is ignored and later
replaced); one stopped after it has its moves finished by `recover`, which every load runs first. The tensor files
carry the checkpoint's id and step in their safetensors metadata and state.json lists them under the same id, so
a folder mixing two saves, a missing file or an unreadable one is refused by name (`CheckpointError`) instead of
resuming into a silently different run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..weights import UnreadableWeightsError, load_safetensors, safetensors_metadata

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, METRICS_FILE = (
    "model.safetensors", "optimizer.safetensors", "state.json", "metrics.jsonl")
RUN_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, METRICS_FILE)
STAGING_DIR, COMMITTED_DIR = ".staging", ".committed"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, unreadable or torn (files from two saves): resuming it would diverge."""


class RunExistsError(FileExistsError, ValueError):
    """A fresh run asked for in a folder that already holds one (a ValueError too: a bad setting, for the CLI)."""


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Write model (its state_dict, or the given named tensors), optimizer and `state` (JSON-serialisable)
    into run_dir, all of them or (if stopped midway) none."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recover(run_dir)  # an earlier commit must land before this one takes its place
    staging = run_dir / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # what a stopped save left: never committed
    staging.mkdir()
    state = dict(state)
    tag = {"checkpoint": f"{state.get('step', 0)}-{uuid.uuid4().hex[:12]}", "step": str(state.get("step", 0))}
    named = model if isinstance(model, dict) else model.state_dict()
    save_file({name: t.detach().contiguous().cpu() for name, t in named.items()}, staging / MODEL_FILE, tag)
    files = [MODEL_FILE]
    if optimizer is not None:
        saved = optimizer.state_dict()
        moments = {f"{index}.{name}": torch.as_tensor(value).cpu()
                   for index, entries in saved["state"].items() for name, value in entries.items()}
        save_file(moments, staging / OPTIMIZER_FILE, tag)
        files.append(OPTIMIZER_FILE)
        state["param_groups"] = saved["param_groups"]
    state["checkpoint"] = {"id": tag["checkpoint"], "files": files}
    save_state(staging, state)
    for name in (*files, STATE_FILE):
        _fsync(staging / name)  # on disk before the rename that makes them the checkpoint
    os.replace(staging, run_dir / COMMITTED_DIR)
    _fsync(run_dir)
    recover(run_dir)


def recover(run_dir: str | Path) -> None:
    """Finish moving a committed checkpoint (run/.committed/) into run_dir: a no-op unless a save was stopped
    between its commit and its last move. Safe to repeat and to run again after being stopped itself."""
    committed = Path(run_dir) / COMMITTED_DIR
    if not committed.is_dir():
        return
    # state.json first: readers that only want the settings (the CLI) then see the newest ones at once
    names = sorted(os.listdir(committed), key=lambda name: name != STATE_FILE)
    for name in names:
        os.replace(committed / name, Path(run_dir) / name)
    committed.rmdir()
    _fsync(Path(run_dir))


def save_state(run_dir: str | Path, state: dict) -> None:
    """Write state.json alone (runs whose weights are saved another way, e.g. save_pretrained)."""
    _atomic(Path(run_dir) / STATE_FILE, lambda path: Path(path).write_text(json.dumps(state, indent=1)))


def load_state(run_dir: str | Path) -> dict:
    """The JSON state of a run folder, after checking that the checkpoint files it lists belong to it."""
    recover(run_dir)
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (missing {STATE_FILE})")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); the run cannot be resumed from it") from error
    for name in state.get("checkpoint", {}).get("files", ()):
        _check(Path(run_dir) / name, state)
    return state


def changed_settings(saved, config, resumable: tuple[str, ...]) -> list[str]:
    """Names of the fields where config (a dataclass) differs from saved (the same class, from a checkpoint),
    the `resumable` ones aside: what a resumed run must refuse."""
    return [f.name for f in dataclasses.fields(config)
            if f.name not in resumable and getattr(saved, f.name) != getattr(config, f.name)]


def load_tensors(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, by name (on the CPU)."""
    return _load(Path(run_dir) / MODEL_FILE)


def load_weights(run_dir: str | Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into `model` (strict: every tensor must match)."""
    model.load_state_dict(load_tensors(run_dir), strict=True)


def load_optimizer(run_dir: str | Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore the optimizer saved by `save_checkpoint` (moments onto the parameters' devices)."""
    moments = _load(Path(run_dir) / OPTIMIZER_FILE)
    entries: dict[int, dict] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})


def existing_run_files(run_dir: str | Path, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Which of `names` (files or folders) run_dir holds, plus a committed checkpoint not yet moved into place."""
    run_dir = Path(run_dir)
    return [name for name in (*names, COMMITTED_DIR) if (run_dir / name).exists()]


def remove_run_files(run_dir: str | Path, names: tuple[str, ...] = RUN_FILES) -> None:
    """Delete `names` (files or folders) and any staged or committed checkpoint from run_dir (an overwrite)."""
    for name in (*names, STAGING_DIR, COMMITTED_DIR):
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def append_metrics(run_dir: str | Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as file:
        file.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records logged after `step` (a resumed run logs those steps again)."""
    records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    _atomic(Path(run_dir) / METRICS_FILE,
            lambda path: Path(path).write_text("".join(json.dumps(r) + "\n" for r in records)))


def _check(path: Path, state: dict) -> None:
    """Refuse, by name, a checkpoint file that is missing, unreadable or from another save than state.json."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint at step {state.get('step')} is incomplete")
    try:
        tag = safetensors_metadata(path)
    except UnreadableWeightsError as error:
        raise CheckpointError(f"{error}; the run cannot be resumed from it") from error
    if tag.get("checkpoint") != state["checkpoint"]["id"]:
        raise CheckpointError(f"{path} (step {tag.get('step')}) was not saved with {path.parent / STATE_FILE} "
                              f"(step {state.get('step')}): a torn checkpoint; resuming it would diverge")


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(path)
    except UnreadableWeightsError as error:
        raise CheckpointError(str(error)) from error


def _atomic(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(str(temporary))
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, where the platform allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
