"""The shared step loop on a toy regression: the order of its records, saves, early stop and loss check."""

import pytest
import torch

from sparsek.train.checkpoint import read_metrics
from sparsek.train.steps import Interval, StepLoop, Throughput


class Config:
    steps, log_every, eval_every, grad_clip, progress = 7, 2, 3, 1.0, False


def toy_loop(tmp_path, saves, **overrides) -> StepLoop:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD([{"params": [layer.weight]}, {"params": [layer.bias]}], lr=0.0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    options = dict(params=list(layer.parameters()), loss=lambda step: ((layer(x) - y) ** 2).mean(),
                   lr_factor=lambda step: 1 / (step + 1), peak_lrs=[0.1, 0.2],
                   lr_entry=lambda factor: {"lr_factor": factor}, device=torch.device("cpu"), bf16=False,
                   tokens_per_step=16, timer=Interval(), evaluate=lambda: {"loss": 1.0, "ppl": 2.0},
                   save_due=lambda step: step % 4 == 0, save=lambda: saves.append(optimizer.param_groups[1]["lr"]),
                   desc="toy")
    return StepLoop(Config(), tmp_path, optimizer, **{**options, **overrides})


def test_records_saves_and_rates(tmp_path):
    saves, state = [], {"step": 0, "tokens": 0}
    assert toy_loop(tmp_path, saves).run(state)
    assert state == {"step": 7, "tokens": 7 * 16}
    assert saves == [pytest.approx(0.2 / 4)]                           # after step 4, at step 3's rate
    records = read_metrics(tmp_path)
    assert [(r["step"], "loss" in r) for r in records] == [(2, True), (3, False), (4, True), (6, True), (6, False),
                                                            (7, True)]
    assert list(records[0]) == ["step", "tokens", "loss", "lr_factor", "grad_norm", "seconds"]
    assert records[1] == {"step": 3, "tokens": 48, "eval_loss": 1.0, "eval_ppl": 2.0}


def test_resumes_mid_run_and_stops_early(tmp_path):
    saves, state = [], {"step": 5, "tokens": 80}
    assert not toy_loop(tmp_path, saves, out_of_time=lambda: True, timer=Throughput(torch.device("cpu"))).run(state)
    assert state == {"step": 6, "tokens": 96} and len(saves) == 1      # a checkpoint, then the stop
    assert list(read_metrics(tmp_path)[0]) == ["step", "tokens", "loss", "lr_factor", "grad_norm", "tokens_per_s"]


def test_a_non_finite_loss_stops_the_run(tmp_path):
    loop = toy_loop(tmp_path, [], loss=lambda step: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="at step 2"):
        loop.run({"step": 0, "tokens": 0})
    assert not (tmp_path / "metrics.jsonl").exists()
