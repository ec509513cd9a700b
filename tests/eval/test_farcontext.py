"""The far-context comparison end to end on a tiny model: every method runs, results resume, the table prints."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from sparsek.eval.farcontext import main  # noqa: E402

from ..conftest import tiny_transformers_model  # noqa: E402


def test_every_method_runs_and_a_second_run_resumes(tmp_path, corpus_dir, capsys):
    args = ["--model", str(tiny_transformers_model(tmp_path)), "--data", str(corpus_dir), "--layers", "all",
            "--topk", "32", "--window", "16", "--contexts", "384", "--examples", "1", "--depths", "0.5",
            "--tasks", "passkey,recall", "--distill-steps", "2", "--distill-context", "640", "--ppl-context", "384",
            "--ppl-tokens", "768", "--batch-size", "2", "--tail", "48", "--out", str(tmp_path / "out"),
            "--device", "cpu"]
    results = main(args)
    expected = {"original@384", "zero@384", "distilled@384", "streaming_llm@384", "h2o@384", "snapkv@384"}
    assert expected <= set(results)
    assert "ppl" in results["original@384"] and "ppl" not in results["h2o@384"]   # peers are not run in parallel
    assert results["distill_max_lookup1_ctx640_steps2"]["steps"] == 2
    assert (tmp_path / "out" / "scorers_max_lookup1_ctx640_steps2.pt").is_file()
    first = capsys.readouterr().out
    assert "streaming_llm" in first.split("method")[-1]                          # the table, printed last
    again = main(args)                                                            # everything done: nothing reruns
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)
    assert "suite average" not in capsys.readouterr().out


def test_scorers_saved_under_other_distill_settings_are_not_reused():
    from argparse import Namespace

    from sparsek.eval.farcontext import DISTILL_CONTEXT, DISTILL_LR, DISTILL_STEPS, _distill_setting
    default = dict(distill_lookup=1.0, distill_context=DISTILL_CONTEXT, distill_steps=DISTILL_STEPS,
                   distill_lr=DISTILL_LR, distill_sinks=0)
    names = {_distill_setting(Namespace(**{**default, **change}))
             for change in ({}, {"distill_lookup": 0.0}, {"distill_lookup": 0.5}, {"distill_context": 16384},
                            {"distill_steps": 600}, {"distill_lr": 1e-3})}
    assert len(names) == 6
    assert _distill_setting(Namespace(**default)) == "_lookup1"   # files of earlier runs keep their names


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        main(["--methods", "original,streaming", "--out", str(tmp_path)])


def test_runs_are_scored_as_they_are_and_must_be_sparsek(tmp_path, corpus_dir):
    from sparsek.integrations.hf import convert
    from sparsek.integrations.pretrained import load_pretrained

    base = tiny_transformers_model(tmp_path)
    model, tokenizer = load_pretrained(str(base))
    convert(model, topk=32, window=16, slope=1.0)
    model.save_pretrained(tmp_path / "run" / "model")
    tokenizer.save_pretrained(tmp_path / "run" / "model")
    args = ["--model", str(base), "--data", str(corpus_dir), "--contexts", "384", "--examples", "1", "--depths",
            "0.5", "--tasks", "passkey", "--ppl-context", "384", "--ppl-tokens", "768", "--batch-size", "2",
            "--methods", "", "--device", "cpu"]
    results = main(args + ["--runs", f"mine={tmp_path / 'run'}", "--out", str(tmp_path / "out")])
    assert set(k for k in results if "@" in k) == {"mine@384"} and "ppl" in results["mine@384"]
    with pytest.raises(ValueError, match="SparseK models"):
        main(args + ["--runs", f"plain={base}", "--out", str(tmp_path / "out2")])
