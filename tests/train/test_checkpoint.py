"""Checkpoints are all or nothing: a save stopped at any point leaves a folder that resumes exactly (from the last
complete checkpoint, or the new one if it was committed), and a folder mixing two saves, missing a file or holding
an unreadable one is refused with the file's name, never resumed into a silently different run."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsek.train import checkpoint, train
from sparsek.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CheckpointError

from .test_train import configs, losses


def saved_run(run_dir, step: int, seed: int = 0) -> torch.nn.Module:
    """A tiny model and AdamW state saved as the checkpoint of `step`."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    checkpoint.save_checkpoint(run_dir, model, optimizer, {"step": step})
    return model


def test_crash_between_weights_and_state_resumes_the_last_complete_checkpoint(tmp_path, corpus_dir, monkeypatch):
    straight, model_config = configs(tmp_path / "straight", corpus_dir, steps=4, checkpoint_every=1)
    train(straight, model_config)

    # The save of step 2 dies after its weights were written, before its state.json.
    write_state, calls = checkpoint.save_state, []

    def crash_on_the_second_save(run_dir, state):
        calls.append(state["step"])
        assert (Path(run_dir) / MODEL_FILE).is_file()  # the weights of this save are on disk already
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_state(run_dir, state)

    crashed, _ = configs(tmp_path / "crashed", corpus_dir, steps=4, checkpoint_every=1)
    monkeypatch.setattr(checkpoint, "save_state", crash_on_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, model_config)
    monkeypatch.undo()
    assert calls == [1, 2]

    assert checkpoint.load_state(tmp_path / "crashed")["step"] == 1  # the last complete checkpoint
    train(crashed, None)
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")
    a = load_file(tmp_path / "straight" / MODEL_FILE)
    b = load_file(tmp_path / "crashed" / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_stopped_after_its_commit_is_finished_on_load(tmp_path, monkeypatch):
    saved_run(tmp_path, step=1)
    replace = os.replace

    def stop_before_the_weights_move(source, target):
        if Path(source).parent.name == checkpoint.COMMITTED_DIR and Path(source).name == MODEL_FILE:
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", stop_before_the_weights_move)
    with pytest.raises(KeyboardInterrupt):
        saved_run(tmp_path, step=2, seed=1)
    monkeypatch.undo()
    state = checkpoint.load_state(tmp_path)                 # moves the rest of the committed save into place
    assert state["step"] == 2 and not (tmp_path / checkpoint.COMMITTED_DIR).exists()
    model = saved_run(tmp_path / "again", step=2, seed=1)
    tensors = checkpoint.load_tensors(tmp_path)
    assert all(torch.equal(tensors[name], value) for name, value in model.state_dict().items())


def _from_another_save(run: Path, other: Path) -> str:
    shutil.copy(other / MODEL_FILE, run / MODEL_FILE)
    return MODEL_FILE


def _missing_optimizer(run: Path, other: Path) -> str:
    (run / OPTIMIZER_FILE).unlink()
    return OPTIMIZER_FILE


def _truncated_weights(run: Path, other: Path) -> str:
    data = (run / MODEL_FILE).read_bytes()
    (run / MODEL_FILE).write_bytes(data[: len(data) // 2])
    return MODEL_FILE


def _garbled_state(run: Path, other: Path) -> str:
    (run / STATE_FILE).write_text('{"step": 1, "tok')
    return STATE_FILE


@pytest.mark.parametrize("damage", [_from_another_save, _missing_optimizer, _truncated_weights, _garbled_state])
def test_damaged_checkpoint_is_refused_by_name(tmp_path, damage):
    saved_run(tmp_path / "run", step=1)
    saved_run(tmp_path / "other", step=2, seed=1)
    name = damage(tmp_path / "run", tmp_path / "other")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "run" / name))):
        checkpoint.load_state(tmp_path / "run")


def test_resume_refuses_a_torn_run_folder(tmp_path, corpus_dir):
    """Step-2 weights beside step-1 state (what the old per-file saves left after a crash): train names the file."""
    first, model_config = configs(tmp_path / "run", corpus_dir, steps=1)
    train(first, model_config)
    later, _ = configs(tmp_path / "later", corpus_dir, steps=2)
    train(later, model_config)
    shutil.copy(tmp_path / "later" / MODEL_FILE, tmp_path / "run" / MODEL_FILE)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "run" / MODEL_FILE)) + ".*torn"):
        train(configs(tmp_path / "run", corpus_dir, steps=4)[0], None)
