"""Training runs: checkpoints resume exactly, two data-parallel processes follow one, the CLI runs end to end."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sparsek.models import LMConfig
from sparsek.train import TrainConfig, learning_rate, train
from sparsek.train.checkpoint import read_metrics
from sparsek.train.compare import load_model

MODEL = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context=32, budget=8)


def configs(run_dir, corpus_dir, attention="sparsek_window", **overrides):
    options = dict(run_dir=str(run_dir), data=str(corpus_dir), batch_size=4, steps=6, lr=3e-3, warmup_steps=2,
                   log_every=1, checkpoint_every=3, eval_tokens=256, progress=False, device="cpu")
    train_config = TrainConfig(**{**options, **overrides})
    return train_config, LMConfig(attention=attention, **MODEL)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 60) == pytest.approx(0.55)
    assert learning_rate(config, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("attention", ["sparsek_window", "hash"])
def test_resume_continues_exactly(tmp_path, corpus_dir, attention):
    straight, model_config = configs(tmp_path / "straight", corpus_dir, attention)
    summary = train(straight, model_config)
    assert summary["finished"] and summary["step"] == 6 and summary["tokens"] == 6 * 4 * 32
    assert (tmp_path / "straight" / "loss.png").is_file() and (tmp_path / "straight" / "position.png").is_file()

    # The same run stopped by its time limit after its first step (with a checkpoint), then resumed.
    first, _ = configs(tmp_path / "resumed", corpus_dir, attention, max_minutes=1e-9)
    assert train(first, model_config) == {"finished": False, "step": 1, "tokens": 4 * 32}
    second, _ = configs(tmp_path / "resumed", corpus_dir, attention)
    train(second, None)  # from the run folder alone
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path, corpus_dir):
    config, model_config = configs(tmp_path, corpus_dir, steps=3)
    train(config, model_config)
    config.lr = 1e-2
    with pytest.raises(ValueError, match="lr"):
        train(config, model_config)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(configs(tmp_path / "empty", corpus_dir)[0], None)


def test_max_minutes_stops_with_a_checkpoint(tmp_path, corpus_dir):
    config, model_config = configs(tmp_path, corpus_dir, max_minutes=1e-9)
    summary = train(config, model_config)
    assert not summary["finished"] and summary["step"] == 1
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 1


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tmp_path, corpus_dir):
    single, model_config = configs(tmp_path / "single", corpus_dir, steps=4)
    train(single, model_config)
    args = ["--run-dir", str(tmp_path / "ddp"), "--data", str(corpus_dir), "--batch-size", "4", "--steps", "4",
            "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1", "--checkpoint-every", "3",
            "--eval-tokens", "256", "--no-progress", "--device", "cpu", "--attention", "sparsek_window"]
    args += [a for key, value in MODEL.items() for a in (f"--{key.replace('_', '-')}", str(value))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # One retry, for a launch that dies or hangs: now and then (about 1 clean-clone run in 6, 2026-12-04 and
    # 12-05; never in 12 runs of this test alone) a worker aborts with "terminate called without an active
    # exception" and the other waits for it until the time limit. A run that finishes with other results than
    # the single process still fails at once, below.
    for _ in range(2):
        shutil.rmtree(tmp_path / "ddp", ignore_errors=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(_free_port()), "-m", "sparsek", "train", *args]
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired as err:
            failure = f"timed out after 150 s; stderr: {str(err.stderr)[-3000:]}"
            continue
        if result.returncode == 0:
            break
        failure = result.stderr[-3000:]
    else:
        pytest.fail(f"the two-process run failed twice; the last time: {failure}")
    state = json.loads((tmp_path / "ddp" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ddp")), torch.tensor(losses(tmp_path / "single")),
                               rtol=1e-5, atol=1e-5)
    a = load_file(tmp_path / "single" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_cli_train_resumes_from_the_run_folder_alone(tmp_path, corpus_dir, capsys):
    from sparsek.cli import main
    run = str(tmp_path / "run")
    main(["train", "--run-dir", run, "--data", str(corpus_dir), "--context", "48", "--budget", "12", "--d-model", "32",
          "--steps", "2", "--batch-size", "2", "--no-progress", "--device", "cpu", "--eval-tokens", "96"])
    main(["train", "--run-dir", run, "--steps", "4", "--no-progress"])  # model and data come from the checkpoint
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 4 and state["model"]["context"] == 48 and state["train"]["data"] == str(corpus_dir)
    capsys.readouterr()
    assert main(["train", "--run-dir", run, "--steps", "6", "--budget", "16", "--no-progress"]) == 2
    assert "different model" in capsys.readouterr().err             # one line, status 2 (tests/test_cli_errors.py)


def test_cli_compare(tmp_path, corpus_dir, capsys):
    from sparsek.cli import main
    out = tmp_path / "compare"
    args = ["compare", "--out-dir", str(out), "--data", str(corpus_dir), "--attention", "sparsek_window,window",
            "--steps", "4", "--batch-size", "2", "--context", "32", "--budget", "8", "--d-model", "32",
            "--eval-tokens", "128", "--sample-tokens", "40", "--no-progress", "--device", "cpu"]
    main(args)
    printed = capsys.readouterr().out
    assert "| sparsek_window |" in printed and "| window |" in printed and "Sample from sparsek_window" in printed
    assert "already holds a finished run" not in printed
    rows = json.loads((out / "results.json").read_text())
    assert [r["attention"] for r in rows] == ["sparsek_window", "window"] and all(r["finished"] for r in rows)
    for name in ("results.md", "loss.png", "position.png", "sample.txt"):
        assert (out / name).is_file(), name
    assert len((out / "sample.txt").read_bytes()) >= 40  # the prompt plus 40 generated bytes (decoded, lossy)

    model = load_model(out / "sparsek_window")
    assert model.config.attention == "sparsek_window" and not model.training

    main(args)                        # again: both runs are finished, and the table says their rows are old
    printed = capsys.readouterr().out
    assert printed.count("already holds a finished run, reported as it was") == 2
