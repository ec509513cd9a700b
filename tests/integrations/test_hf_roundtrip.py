"""Saved SparseK models through transformers' own loaders: never silently the original model."""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsek.integrations.hf import convert, load  # noqa: E402

from ..conftest import tiny_transformers_model  # noqa: E402


@pytest.fixture
def saved(tmp_path):
    """(converted model, its save_pretrained folder): the tiny Llama of conftest, converted with random scorers
    so that dropping them changes the logits."""
    plain = transformers.AutoModelForCausalLM.from_pretrained(tiny_transformers_model(tmp_path)).eval()
    model = convert(plain, topk=3, window=2, slope=0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparsek_scorer" in name:
                p.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "sparsek")
    return model, tmp_path / "sparsek"


@torch.no_grad()
def test_from_pretrained_of_saved_model_is_converted_or_refused(saved):
    """AutoModelForCausalLM.from_pretrained (or from_config) of a saved SparseK model: the converted model's
    logits or an error that points to load(); load gives those logits."""
    model, folder = saved
    ids = torch.randint(0, 256, (2, 17))
    want = model(ids).logits
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    except ValueError as error:
        assert "sparsek.integrations.hf.load" in str(error)
    else:
        torch.testing.assert_close(loaded(ids).logits, want)
    with pytest.raises(ValueError, match=r"sparsek\.integrations\.hf\.load"):
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    torch.testing.assert_close(load(folder)(ids).logits, want)
    # Without the settings the same config builds the original model, as it always did.
    config = transformers.AutoConfig.from_pretrained(folder)
    del config.sparsek
    assert not hasattr(transformers.AutoModelForCausalLM.from_config(config).model.layers[0].self_attn,
                       "sparsek_scorer")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_load_reports_no_unexpected_scorer_keys(saved, capfd):
    """transformers' load report lists keys the model lacks as UNEXPECTED; load() puts the scorers in itself, so
    they are not reported (output and log records both checked, at transformers' default verbosity)."""
    _, folder = saved
    records, logger = Records(), logging.getLogger("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(records)
    try:
        capfd.readouterr()
        load(folder)
        out, err = capfd.readouterr()
    finally:
        logger.removeHandler(records)
        transformers.logging.set_verbosity(verbosity)
    said = "\n".join([out, err, *records.messages])
    assert "UNEXPECTED" not in said and "sparsek_scorer" not in said, said
