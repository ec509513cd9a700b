"""The optimisation loop that training from scratch (`loop.train`) and fine-tuning (`finetune.finetune`) share.

A step sets the scheduled learning rates, takes the loss under autocast, steps the optimizer on the clipped
gradients; every log_every steps a metrics record follows, every eval_every steps a held-out evaluation, and a
checkpoint where the caller's rule asks for one. What the two callers do differently comes in as `StepLoop`
fields: the loss of a step, the rates and how records name them, their timing, when to save and when to stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, distributed


class Interval:
    """Fine-tuning's record timing: "seconds" since the previous record (or the start), evaluations included."""

    def restart(self) -> None:
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        """A step's tokens, which this timing does not count."""

    def evaluated(self) -> None:
        """An evaluation has run; its time stays in the interval."""

    def entry(self) -> dict:
        now = time.perf_counter()
        entry, self.start = {"seconds": now - self.start}, now
        return entry

    def postfix(self, entry: dict) -> dict:
        return {}


class Throughput:
    """Training's record timing: "tokens_per_s" over the steps since the previous record, evaluations left out.

    Reading the clock waits for the GPU, so that the time covers the work queued on it."""

    def __init__(self, device: torch.device):
        self.device = device

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def evaluated(self) -> None:
        self.restart()  # keep evaluation out of the throughput

    def entry(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        entry = {"tokens_per_s": self.tokens / (now - self.start)}
        self.start, self.tokens = now, 0
        return entry

    def postfix(self, entry: dict) -> dict:
        return {"tok_s": f"{entry['tokens_per_s']:.0f}"}


def append_eval(run_dir: Path, step: int, tokens: int, result: dict) -> None:
    """The metrics record of a held-out evaluation (result: `sparsek.heldout.evaluate`'s) after `step`."""
    checkpoint.append_metrics(run_dir, {"step": step, "tokens": tokens, "eval_loss": result["loss"],
                                        "eval_ppl": result["ppl"]})


def _never() -> bool:
    return False


@dataclass
class StepLoop:
    """Steps state["step"] .. config.steps - 1 of a run; `run` advances state["step"] and state["tokens"].

    config: anything with steps, log_every, eval_every (0: never), grad_clip and progress (TrainConfig,
    FinetuneConfig). loss(step): the scalar mean next-token loss of that step's batch, with grad; it runs under
    bf16 autocast on device when bf16. Param group g of optimizer runs at peak_lrs[g] * lr_factor(step), and
    lr_entry(factor) is what a metrics record says of it. params: those whose gradients are clipped, in this
    order (it sets the float sum of the norm). tokens_per_step: the targets of a step over all processes.
    timer: Interval or Throughput. evaluate(): the held-out result (run on the main process only). save(): a
    checkpoint, after the steps where save_due(step) holds and where out_of_time() holds on any process before
    the last step, which ends the run early. Metrics and the progress bar (titled desc) are the main process's.
    """

    config: Any
    run_dir: Path
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    loss: Callable[[int], torch.Tensor]
    lr_factor: Callable[[int], float]
    peak_lrs: list[float]
    lr_entry: Callable[[float], dict]
    device: torch.device
    bf16: bool
    tokens_per_step: int
    timer: Interval | Throughput
    evaluate: Callable[[], dict]
    save_due: Callable[[int], bool]
    save: Callable[[], None]
    desc: str
    out_of_time: Callable[[], bool] = _never
    world: distributed.World = distributed.World()

    def run(self, state: dict) -> bool:
        """Train from state["step"] on; True when config.steps is reached, False when stopped early."""
        steps, bar = self.config.steps, self._bar(state["step"])
        self.timer.restart()
        stop = False
        while state["step"] < steps and not stop:
            loss, factor, grad_norm = self._step(state["step"])
            state["step"], state["tokens"] = state["step"] + 1, state["tokens"] + self.tokens_per_step
            self.timer.add(self.tokens_per_step)
            if bar is not None:
                bar.update(1)
            if state["step"] % self.config.log_every == 0 or state["step"] == steps:
                self._log(state, loss, factor, grad_norm, bar)
            if self.config.eval_every and state["step"] % self.config.eval_every == 0 and state["step"] < steps:
                self._evaluate(state)
            stop = distributed.any_true(self.out_of_time(), self.world, self.device) and state["step"] < steps
            if self.save_due(state["step"]) or stop:
                self.save()
        if bar is not None:
            bar.close()
        return not stop

    def _bar(self, first: int):
        if not (self.config.progress and self.world.main):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.config.steps, initial=first, desc=self.desc, unit="step")

    def _step(self, step: int) -> tuple[torch.Tensor, float, torch.Tensor]:
        """One optimizer step: (loss, learning-rate factor, gradient norm before clipping)."""
        factor = self.lr_factor(step)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * factor
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(step)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, factor, grad_norm

    def _log(self, state: dict, loss: torch.Tensor, factor: float, grad_norm: torch.Tensor, bar) -> None:
        value = distributed.mean(loss.detach(), self.world).item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {state['step']}")
        timing = self.timer.entry()
        record = {"step": state["step"], "tokens": state["tokens"], "loss": value, **self.lr_entry(factor),
                  "grad_norm": grad_norm.item(), **timing}
        if self.world.main:
            checkpoint.append_metrics(self.run_dir, record)
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}", **self.timer.postfix(timing))

    def _evaluate(self, state: dict) -> None:
        if self.world.main:
            append_eval(self.run_dir, state["step"], state["tokens"], self.evaluate())
        distributed.barrier(self.world)
        self.timer.evaluated()
