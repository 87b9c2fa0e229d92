"""Config fields that name attention mechanisms are validated, and errors name the field and the choices."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModel

import hf_models  # noqa: F401  (registers the specs and the config check)
from hf_models import SparseBartConfig

from .tiny import config_kwargs, stock_model


def _saved_with(tmp_path, value):
    stock_model("bert", "entmax:alpha=1.3").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["attention_spec"] = value
    path.write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("value", ["", "   ", 3, ["sparsemax"]])
def test_an_empty_or_non_string_attention_spec_does_not_load_softmax(tmp_path, value):
    with pytest.raises(ValueError) as err:
        AutoModel.from_pretrained(_saved_with(tmp_path, value))
    message = str(err.value)
    assert "attention_spec" in message and "sparsemax" in message and "entmax" in message


def test_an_invalid_saved_spec_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="attention_spec.*gamma"):
        AutoModel.from_pretrained(_saved_with(tmp_path, "sparsemax:gamma=0"))


def test_a_null_attention_spec_is_the_default(tmp_path):
    model = AutoModel.from_pretrained(_saved_with(tmp_path, None))
    assert model.config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize("field, value, words", [
    ("cross_attn", "continuous_softmax:basis=3", ["cross_attn", "basis", "multiple of the number of widths"]),
    ("cross_attn", "continuous_softmax:widths=abc", ["cross_attn", "widths", "'/'-separated numbers"]),
    ("encoder_attn", "continuous_sparsemax:basis=1", ["encoder_attn", "basis", "2, 4"]),
    ("decoder_attn", 3, ["decoder_attn", "must be a string", "sparsemax"]),
    ("decoder_attn", "", ["decoder_attn", "empty", "sparsemax"]),
])
def test_sparse_config_errors_name_the_field_and_the_choices(field, value, words):
    with pytest.raises(ValueError) as err:
        SparseBartConfig(**config_kwargs("bart"), **{field: value})
    for word in words:
        assert word in str(err.value), str(err.value)
