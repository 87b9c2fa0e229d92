"""A trained Sparse* model reloads exactly: identical logits after training, saving and loading.

Marian and Pegasus have fixed sinusoidal position tables that transformers neither saves nor
loads; from_pretrained returns them trainable, so stock Marian changes after a round trip. The
Sparse* classes keep them frozen.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

import hf_models

from .tiny import config_kwargs, model_inputs, stock_model

SPECS = {"encoder_attn": "entmax:alpha=learned", "decoder_attn": "sparsemax", "cross_attn": "entmax15"}


def _train(model: torch.nn.Module, family: str, steps: int = 3) -> torch.Tensor:
    """A few AdamW steps over ``model.parameters()`` (as any training loop does); eval logits after."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    batch = model_inputs(family)
    for _ in range(steps):
        loss = model(**batch, labels=batch["decoder_input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _reloaded_logits(path, family: str) -> torch.Tensor:
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**model_inputs(family)).logits


@pytest.mark.parametrize("family", sorted(hf_models.SPARSE_FAMILIES))
@pytest.mark.parametrize("route", ["converted", "from_config"])
def test_trained_saved_reloaded_model_has_identical_logits(family, route, tmp_path):
    classes = hf_models.SPARSE_FAMILIES[family]
    if route == "converted":
        stock_model(family).save_pretrained(tmp_path / "stock")
        model = classes["seq2seq"].from_pretrained(tmp_path / "stock", **SPECS)
    else:
        torch.manual_seed(0)
        model = classes["seq2seq"](classes["config"](**config_kwargs(family), **SPECS))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = _train(model, family)
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert any("attention_mechanism" in n for n in moved) and len(moved) > 10  # it did train
    model.save_pretrained(tmp_path / "trained")
    assert torch.equal(_reloaded_logits(tmp_path / "trained", family), trained)


@pytest.mark.parametrize("family", ["marian", "pegasus"])
def test_position_tables_stay_frozen(family, tmp_path):
    classes = hf_models.SPARSE_FAMILIES[family]
    stock_model(family).save_pretrained(tmp_path / "stock")
    for model in (classes["seq2seq"].from_pretrained(tmp_path / "stock"),
                  classes["seq2seq"].from_pretrained(tmp_path / "stock", output_loading_info=True)[0],
                  classes["seq2seq"](classes["config"](**config_kwargs(family)))):
        tables = {n: p.requires_grad for n, p in model.named_parameters() if "embed_positions" in n}
        assert len(tables) == 2 and not any(tables.values())


def test_stock_marian_does_not_round_trip(tmp_path):
    """The upstream behaviour the Sparse* classes avoid (if this starts failing, transformers fixed it)."""
    stock_model("marian").save_pretrained(tmp_path / "stock")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "stock")
    assert model.model.encoder.embed_positions.weight.requires_grad
    trained = _train(model, "marian")
    model.save_pretrained(tmp_path / "trained")
    assert (_reloaded_logits(tmp_path / "trained", "marian") - trained).abs().max() > 1e-4
