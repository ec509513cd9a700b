"""`sparsek finetune` end to end on a tiny random transformers model: full and LoRA, all or some layers.

What must hold: fine-tuning lowers the held-out loss, the saved folder reloads as a transformers model with its
SparseK settings and gives back the loss measured before saving, a LoRA run trains few weights, and a run stopped
after a checkpoint and resumed ends exactly where the uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from sparsek.heldout import TransformersLM, evaluate  # noqa: E402
from sparsek.train.finetune import FinetuneConfig, finetune, load_finetuned, tokenized_corpus  # noqa: E402

from ..conftest import damage_file, tiny_transformers_model  # noqa: E402


def settings(tmp_path, corpus_dir, **overrides) -> FinetuneConfig:
    values = dict(model=str(tiny_transformers_model(tmp_path)), run_dir=str(tmp_path / "run"), data=str(corpus_dir),
                  context=48, topk=8, window=8, batch_size=4, steps=12, lr=3e-3, scorer_lr=1e-2, warmup_steps=2,
                  eval_tokens=384, log_every=4, device="cpu", progress=False)
    return FinetuneConfig(**{**values, **overrides})


def reloaded_loss(config: FinetuneConfig) -> tuple[float, torch.nn.Module]:
    model, tokenizer = load_finetuned(config.run_dir)
    heldout = tokenized_corpus(config, tokenizer)[1]
    return evaluate(TransformersLM(model), heldout, config.context, batch_size=config.batch_size,
                    max_tokens=config.eval_tokens)["loss"], model


@pytest.mark.parametrize("sparsek_run", [True, False], ids=["sparsek", "full"])
def test_load_finetuned_names_a_damaged_weights_file(tmp_path, sparsek_run):
    """A run whose model/model.safetensors is cut short (a stopped copy): the error names that file."""
    import transformers

    from sparsek.integrations.hf import convert

    source, saved = tiny_transformers_model(tmp_path), tmp_path / "run" / "model"
    shutil.copytree(source, saved)
    if sparsek_run:
        convert(transformers.AutoModelForCausalLM.from_pretrained(source), topk=4, window=4).save_pretrained(saved)
    damage_file(saved / "model.safetensors", "truncated")
    with pytest.raises(ValueError, match=re.escape(str(saved / "model.safetensors"))):
        load_finetuned(tmp_path / "run")


def test_full_finetune_recovers_and_round_trips(tmp_path, corpus_dir, capsys):
    config = settings(tmp_path, corpus_dir)
    summary = finetune(config)
    assert "converted" in capsys.readouterr().out
    assert summary["finetuned"]["loss"] < summary["converted"]["loss"] - 0.3           # it learned the corpus
    loss, model = reloaded_loss(config)
    assert loss == pytest.approx(summary["finetuned"]["loss"], abs=1e-5)
    assert model.config.sparsek["topk"] == 8 and model.config.sparsek["layers"] == [0, 1]
    scorer = next(p for name, p in model.named_parameters() if "sparsek_scorer" in name)
    assert scorer.abs().sum() > 0                                                   # the trained scorer, reloaded
    ids = torch.randint(0, 256, (2, 20))
    out = model.generate(ids, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 50) and type(out.past_key_values).__name__ == "SparseKHFCache"
    from sparsek.cli import main
    main(["generate", "--model", str(tmp_path / "run" / "model"), "--max-new-tokens", "8", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "topk=8 window=8 (saved model)" in printed and "original" not in printed
    with pytest.raises(ValueError, match="already a SparseK model"):
        finetune(settings(tmp_path, corpus_dir, model=str(tmp_path / "run" / "model")))
    run = tmp_path / "run"
    for name in ("loss.png", "position.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    state = json.loads((run / "state.json").read_text())
    assert state["config"]["topk"] == 8 and state["summary"]["finetuned"]["ppl"] > 1


def test_lora_on_some_layers(tmp_path, corpus_dir):
    pytest.importorskip("peft")
    config = settings(tmp_path, corpus_dir, method="lora", layers="1", lora_rank=4, lr=1e-2)
    summary = finetune(config)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    total = sum(p.numel() for p in load_finetuned(config.run_dir)[0].parameters())
    assert state["trainable_parameters"] < total / 4
    assert summary["finetuned"]["loss"] < summary["converted"]["loss"]
    loss, model = reloaded_loss(config)                                             # adapters merged in
    assert loss == pytest.approx(summary["finetuned"]["loss"], abs=1e-5)
    assert model.config.sparsek["layers"] == [1]
    assert not any("lora" in name for name in model.state_dict())


def test_tasks_mixed_into_the_fine_tuning_data(tmp_path, corpus_dir, monkeypatch):
    """With --tasks, passkey rows reach the model (seen here by decoding what the loss is computed on)."""
    import sparsek.train.finetune as finetune_module
    seen = []
    mix = finetune_module.TaskMixer.__call__

    def spy(self, batch, step, rank=0, world_size=1):
        out = mix(self, batch, step, rank, world_size)
        seen.extend(bytes(row.tolist()).decode("latin-1") for row in out)
        return out

    monkeypatch.setattr(finetune_module.TaskMixer, "__call__", spy)
    finetune(settings(tmp_path, corpus_dir, context=160, steps=3, tasks="passkey", task_fraction=1.0))
    assert len(seen) == 3 * 4 and all("The pass key is" in row for row in seen)
    with pytest.raises(ValueError, match="too short"):
        finetune(settings(tmp_path, corpus_dir, context=48, tasks="passkey", run_dir=str(tmp_path / "short")))


def test_full_attention_control(tmp_path, corpus_dir):
    config = settings(tmp_path, corpus_dir, attention="full", steps=4)
    summary = finetune(config)
    assert set(summary) >= {"original", "finetuned"} and "converted" not in summary
    model, _ = load_finetuned(config.run_dir)
    assert getattr(model.config, "sparsek", None) is None


@pytest.mark.parametrize("bad, message", [
    (dict(layers="x"), "layers"), (dict(layers=","), "layers"), (dict(layers="0,-1"), "layers"),
    (dict(method="qlora"), "method"), (dict(attention="hash"), "attention"), (dict(context=0), "context"),
    (dict(gate="kvv"), "gate"), (dict(topk=0, window=0), "not both 0"), (dict(window=-1), "window must be an int >= 0"),
    (dict(slope=1.0), "no gradient"), (dict(slope=-0.1), "slope"), (dict(tasks="sorting"), "subset"),
    (dict(tasks="passkey", task_fraction=0.0), "fraction"), (dict(save_every=-1), "save_every"),
])
def test_bad_settings(bad, message):
    """Refused when the config is made, before a model loads (conversion would refuse them only after the
    original model's evaluation)."""
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**bad)


def test_gradient_checkpointing_changes_nothing(tmp_path, corpus_dir):
    plain = finetune(settings(tmp_path, corpus_dir, steps=3, run_dir=str(tmp_path / "a")))
    checkpointed = finetune(settings(tmp_path, corpus_dir, steps=3, run_dir=str(tmp_path / "b"),
                                     gradient_checkpointing=True))
    assert checkpointed["finetuned"]["loss"] == pytest.approx(plain["finetuned"]["loss"], abs=1e-6)
    assert checkpointed["finetuned"]["loss"] != plain["converted"]["loss"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path, corpus_dir, monkeypatch, method):
    if method == "lora":
        pytest.importorskip("peft")
    extra = dict(method=method, lr=1e-2) if method == "lora" else {}
    whole = settings(tmp_path, corpus_dir, steps=6, save_every=2, run_dir=str(tmp_path / "whole"), **extra)
    expected = finetune(whole)
    assert not (tmp_path / "whole" / "checkpoint").exists()                        # removed once finished

    from sparsek.data.corpus import DocumentSampler
    batch = DocumentSampler.batch

    def stop_at_step_5(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return batch(self, step)

    parts = dataclasses.replace(whole, run_dir=str(tmp_path / "parts"))
    monkeypatch.setattr(DocumentSampler, "batch", stop_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(parts)
    monkeypatch.undo()
    assert json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())["step"] == 4
    with pytest.raises(ValueError, match="other settings .*topk"):
        finetune(dataclasses.replace(parts, resume=True, topk=4))
    if method == "full":  # the command line: the saved settings, only --resume given
        from sparsek.cli import main
        main(["finetune", "--run-dir", parts.run_dir, "--resume"])
        resumed = json.loads((tmp_path / "parts" / "state.json").read_text())["summary"]
    else:
        resumed = finetune(dataclasses.replace(parts, resume=True))

    assert resumed["finetuned"]["loss"] == pytest.approx(expected["finetuned"]["loss"], abs=1e-6)
    assert resumed["converted"] == expected["converted"]                      # carried over, not re-measured
    a, b = (dict(load_finetuned(run)[0].named_parameters()) for run in (whole.run_dir, parts.run_dir))
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [4, 6]                                                    # log_every=4: no step twice
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        finetune(dataclasses.replace(parts, resume=True))


def test_fresh_finetune_refuses_a_folder_holding_a_run(tmp_path, corpus_dir):
    import re

    from sparsek.train.checkpoint import RunExistsError

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    with pytest.raises(RunExistsError, match=re.escape(str(run)) + ".*--resume.*--overwrite"):
        finetune(settings(tmp_path, corpus_dir, steps=2))
    assert (run / "metrics.jsonl").read_text() == '{"step": 9, "loss": 1.0}\n'   # untouched
    finetune(settings(tmp_path, corpus_dir, steps=2, overwrite=True))
    assert json.loads((run / "state.json").read_text())["config"]["overwrite"] is False
    assert all(r["step"] <= 2 for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))
    with pytest.raises(ValueError, match="exclude each other"):
        settings(tmp_path, corpus_dir, resume=True, overwrite=True)


def test_crash_while_saving_resumes_the_last_complete_checkpoint(tmp_path, corpus_dir, monkeypatch):
    """The step-4 save dies after writing its weights: the resumed run goes on from step 2 and ends where the
    uninterrupted one does (not from step-4 weights with step-2 state)."""
    from sparsek.train import checkpoint

    whole = settings(tmp_path, corpus_dir, steps=6, save_every=2, run_dir=str(tmp_path / "whole"))
    expected = finetune(whole)
    write_state, calls = checkpoint.save_state, []

    def crash_on_the_second_save(folder, state):
        calls.append(state.get("step"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_state(folder, state)

    parts = dataclasses.replace(whole, run_dir=str(tmp_path / "parts"))
    monkeypatch.setattr(checkpoint, "save_state", crash_on_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        finetune(parts)
    monkeypatch.undo()
    assert calls == [2, 4]
    resumed = finetune(dataclasses.replace(parts, resume=True))
    assert resumed["finetuned"]["loss"] == pytest.approx(expected["finetuned"]["loss"], abs=1e-6)
    a, b = (dict(load_finetuned(run)[0].named_parameters()) for run in (whole.run_dir, parts.run_dir))
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)
