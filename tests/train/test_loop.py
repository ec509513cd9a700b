"""A fresh run never overwrites a folder that holds one, unless asked to (overwrite / --overwrite)."""

import re

import pytest

from sparsek.train import train
from sparsek.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, RunExistsError, load_state, read_metrics

from .test_train import configs, losses


def test_fresh_run_refuses_a_folder_holding_a_run(tmp_path, corpus_dir):
    run = tmp_path / "run"
    config, model_config = configs(run, corpus_dir, steps=2)
    train(config, model_config)
    (run / STATE_FILE).unlink()                        # weights, optimizer and metrics left without a state
    before = {name: (run / name).read_bytes() for name in (MODEL_FILE, OPTIMIZER_FILE, "metrics.jsonl")}
    with pytest.raises(RunExistsError, match=re.escape(str(run)) + ".*--overwrite"):
        train(config, model_config)
    assert {name: (run / name).read_bytes() for name in before} == before  # untouched

    config.overwrite = True
    assert train(config, model_config)["finished"]
    state = load_state(run)
    assert state["step"] == 2 and state["train"]["overwrite"] is False   # a later resume does not overwrite
    assert len(losses(run)) == 2                                          # none of the old run's records left

    config.overwrite = False
    with pytest.raises(ValueError, match="resume=True"):               # a complete run, resume turned off
        train(config, model_config, resume=False)


def test_cli_overwrite_flag(tmp_path, corpus_dir):
    from sparsek.cli import main
    run = tmp_path / "run"
    run.mkdir()
    (run / MODEL_FILE).write_bytes(b"an older run's weights")
    (run / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    main(["train", "--run-dir", str(run), "--data", str(corpus_dir), "--context", "32", "--budget", "8",
          "--d-model", "32", "--steps", "2", "--batch-size", "2", "--no-progress", "--device", "cpu",
          "--eval-tokens", "64", "--overwrite"])
    assert load_state(run)["step"] == 2
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [2]
