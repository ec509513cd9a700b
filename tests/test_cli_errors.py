"""The command line reports a user's mistake in one line, `sparsek <command>: error: ...`, with status 2, and checks
everything before anything trains."""

from __future__ import annotations

import pytest

from sparsek.cli import main


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    """(status, stderr lines) of `sparsek argv`, whether the error came from argparse or from the command."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("content,match", [(b"ab\x00cd" * 20, "looks binary"), (b"caf\xe9 au lait " * 20, "not UTF-8")])
def test_binary_or_non_utf8_data_is_refused(tmp_path, capsys, content, match):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    status, err = run_cli(capsys, ["train", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--steps", "1"])
    assert status == 2 and len(err) == 1 and err[0].startswith("sparsek train: error: ") and match in err[0]
    assert str(data) in err[0]


def test_compare_checks_every_variant_before_training_any(tmp_path, capsys):
    out = tmp_path / "cmp"
    status, err = run_cli(capsys, ["compare", "--attention", "full, windw", "--out-dir", str(out), "--steps", "1"])
    assert status == 2 and len(err) == 1 and err[0].startswith("sparsek compare: error: ") and "'windw'" in err[0]
    assert not (out / "full").exists()                     # nothing trained before the bad variant was found


def test_eval_of_a_missing_local_folder_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    status, err = run_cli(capsys, ["eval", "runs/typo"])
    assert status == 2 and err == ["sparsek eval: error: no model folder at runs/typo (a hub name has the form "
                                   "org/name)"]


@pytest.mark.parametrize("argv,command,match", [
    (["train", "--attention", "bogus"], "train", "invalid choice: 'bogus'"),
    (["train", "--budget", "1", "--steps", "1"], "train", "budget must be >= 2"),
    (["train", "--steps", "many"], "train", "invalid int value: 'many'"),
    (["finetune", "--method", "qlora"], "finetune", "invalid choice: 'qlora'"),
    (["distill", "--reduction", "median"], "distill", "invalid choice: 'median'"),
])
def test_bad_options_are_one_line(capsys, argv, command, match):
    status, err = run_cli(capsys, argv)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"sparsek {command}: error: ") and match in err[0]


def test_budget_covering_the_context_warns_it_is_full_attention(capsys):
    from sparsek.cli import warn_full
    from sparsek.models import LMConfig

    warn_full(LMConfig(attention="sparsek_window", budget=256, context=256))
    assert "is full attention" in capsys.readouterr().err
    warn_full(LMConfig(attention="sparsek_window", budget=32, context=256))
    assert capsys.readouterr().err == ""


def test_help_shows_the_defaults_that_apply_and_the_version(capsys):
    from sparsek import __version__
    from sparsek.train import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # `train` runs a tiny model by default, not the dataclass's 512-token one: the help says what applies.
    assert "--context CONTEXT tokens per training row (default 256)" in text
    assert "--budget BUDGET keys each query attends to, window and selection together (default 32)" in text
    assert "hf:<dataset>" in text and f"(default {TrainConfig.data})" in text
    assert "TrainConfig options" in text and "LMConfig options" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"sparsek {__version__}"
