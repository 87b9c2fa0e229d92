"""Tiny models of each family, built from configs (nothing downloaded), and helpers to compare them.

The initialization scale is raised (``INIT``) so that attention scores spread enough for
sparse mechanisms to give exact zeros; with transformers' 0.02 every row would be near-uniform.
"""

from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
    PegasusConfig,
    PegasusForConditionalGeneration,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 40
PAD = 1
BOS = 0
EOS = 2
INIT = 0.5

SEQ2SEQ = ("bart", "marian", "mbart", "pegasus", "t5")
ENCODERS = ("bert", "roberta")
DECODERS = ("gpt2", "llama")

_COMMON = {"vocab_size": VOCAB, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
_BART_LIKE = {
    "d_model": 16, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 64, "init_std": INIT,
    "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "forced_eos_token_id": None,
}


def config_kwargs(family: str) -> dict:
    """Keyword arguments of a tiny config of ``family``."""
    if family in ("bart", "mbart"):
        return dict(_COMMON, **_BART_LIKE, decoder_start_token_id=EOS)
    if family in ("marian", "pegasus"):
        return dict(_COMMON, **_BART_LIKE, decoder_start_token_id=PAD)
    if family == "t5":
        return dict(
            _COMMON, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            initializer_factor=2.0, decoder_start_token_id=PAD, feed_forward_proj="relu",
        )
    if family in ("bert", "roberta"):
        return dict(
            _COMMON, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            initializer_range=INIT, num_labels=3,
        )
    if family == "gpt2":
        return dict(
            _COMMON, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, initializer_range=INIT,
        )
    if family == "llama":
        return dict(
            _COMMON, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=INIT,
        )
    raise ValueError(family)


STOCK = {
    "bart": (BartConfig, BartForConditionalGeneration),
    "mbart": (MBartConfig, MBartForConditionalGeneration),
    "marian": (MarianConfig, MarianMTModel),
    "pegasus": (PegasusConfig, PegasusForConditionalGeneration),
    "t5": (T5Config, T5ForConditionalGeneration),
    "bert": (BertConfig, BertForSequenceClassification),
    "roberta": (RobertaConfig, RobertaForSequenceClassification),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


def stock_model(family: str, attn_implementation: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A tiny stock model of ``family`` in eval mode."""
    config_class, model_class = STOCK[family]
    torch.manual_seed(seed)
    config = config_class(**config_kwargs(family), attn_implementation=attn_implementation)
    return model_class(config).eval()


def token_batch(lengths: tuple[int, ...], seed: int = 0, low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token ids (no special tokens) and their 0/1 attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(low, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def left_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the padding of right-padded ``ids``/``mask`` to the left."""
    order = torch.argsort(mask, dim=1, stable=True)  # pads (0) first, tokens keep their order
    return ids.gather(1, order), mask.gather(1, order)


def model_inputs(family: str, src_lengths=(7, 4), tgt_lengths=(5, 3), seed: int = 0) -> dict:
    """A padded batch for ``family`` (decoder inputs for seq2seq families)."""
    ids, mask = token_batch(src_lengths, seed)
    if family in ENCODERS:
        ids[:, 0] = BOS  # a CLS-like first token
        return {"input_ids": ids, "attention_mask": mask}
    if family in DECODERS:  # left padding (as for batched generation), so that pads precede real keys
        ids, mask = left_pad(ids, mask)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    dec, dec_mask = token_batch(tgt_lengths, seed + 1)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}


def output_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The main output tensor (logits)."""
    with torch.no_grad():
        return model(**batch).logits


def assert_padding_invariant(model: torch.nn.Module, family: str, atol: float = 1e-9) -> None:
    """A padded batch gives, at every real position, the outputs of each sequence run alone.

    Compared in float64 (the model is converted in place), where the only differences left are
    rounding: any attention to a padded key would show far above ``atol``.
    """
    model.double()
    batch = model_inputs(family)
    out = output_of(model, batch)
    for i in range(batch["input_ids"].shape[0]):
        if family in DECODERS:
            n = int(batch["attention_mask"][i].sum())
            alone = output_of(model, {"input_ids": batch["input_ids"][i : i + 1, -n:]})
            torch.testing.assert_close(out[i : i + 1, -n:], alone, atol=atol, rtol=1e-7)
            continue
        single = {}
        for key, value in batch.items():
            mask_key = "decoder_attention_mask" if key.startswith("decoder") else "attention_mask"
            n = int(batch[mask_key][i].sum())
            single[key] = value[i : i + 1, :n]
        alone = output_of(model, single)
        if family in ENCODERS:  # sequence classification: one row per sequence
            torch.testing.assert_close(out[i : i + 1], alone, atol=atol, rtol=1e-7)
        else:
            n = alone.shape[1]
            torch.testing.assert_close(out[i : i + 1, :n], alone, atol=atol, rtol=1e-7)
