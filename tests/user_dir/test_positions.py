"""``--positions sinusoidal|learned|nope|alibi`` of the sparse_transformer architectures."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import plugin
from plugin.positions import ALiBiAttentionMechanism

from .helpers import (
    NO_DROPOUT,
    PAIRS,
    build_model,
    generate_argv,
    make_batch,
    parse_generate_output,
    run_cli,
    train_argv,
)
from .test_variants_in_the_model import check_incremental_equals_full, check_padding_invariance

ARCH = "sparse_transformer_tiny"


def _scalable_or_entmax() -> str:
    """The scalable 1.5-entmax spec where this checkout registers it, else 1.5-entmax."""
    try:
        return plugin.canonical_spec("scalable_entmax:alpha=1.5")
    except ValueError:
        return "entmax:alpha=1.5"


def _self_attentions(model):
    enc = [layer.self_attn for layer in model.encoder.layers]
    dec = [layer.self_attn for layer in model.decoder.layers]
    cross = [layer.encoder_attn for layer in model.decoder.layers]
    return enc, dec, cross


def test_nope_has_no_position_embeddings(data_bin):
    model, _ = build_model(data_bin, ARCH, "--positions", "nope")
    assert model.encoder.embed_positions is None and model.decoder.embed_positions is None
    assert not any("embed_positions" in name for name in model.state_dict())


def test_nope_encoder_is_permutation_equivariant(data_bin):
    model, task = build_model(data_bin, ARCH, "--positions", "nope", *NO_DROPOUT)
    model.eval()
    batch = make_batch(task, [PAIRS[0]])
    src = batch.src_tokens
    body = torch.arange(src.size(1) - 1)  # keep </s> last, permute the words
    perm = torch.cat([body.flip(0), torch.tensor([src.size(1) - 1])])
    with torch.no_grad():
        out = model.encoder(src, src_lengths=batch.src_lengths)["encoder_out"][0]
        shuffled = model.encoder(src[:, perm], src_lengths=batch.src_lengths)["encoder_out"][0]
    assert_close(shuffled, out[perm], rtol=1e-5, atol=1e-5)
    # the default (sinusoidal) encoder is not: the same check fails
    model, task = build_model(data_bin, ARCH, *NO_DROPOUT)
    model.eval()
    with torch.no_grad():
        out = model.encoder(src, src_lengths=batch.src_lengths)["encoder_out"][0]
        shuffled = model.encoder(src[:, perm], src_lengths=batch.src_lengths)["encoder_out"][0]
    assert not torch.allclose(shuffled, out[perm], atol=1e-3)


def test_alibi_biases_the_self_attentions_only(data_bin):
    model, _ = build_model(data_bin, ARCH, "--positions", "alibi", "--decoder-attn", "entmax:alpha=1.5")
    enc, dec, cross = _self_attentions(model)
    assert model.encoder.embed_positions is None and model.decoder.embed_positions is None
    assert all(isinstance(m.mechanism, ALiBiAttentionMechanism) and m.mechanism.symmetric for m in enc)
    assert all(isinstance(m.mechanism, ALiBiAttentionMechanism) and not m.mechanism.symmetric for m in dec)
    assert all(m.spec == "entmax:alpha=1.5" for m in dec)
    assert not any(isinstance(m.mechanism, ALiBiAttentionMechanism) for m in cross)


@pytest.mark.parametrize("decoder_attn", ["softmax", "entmax:alpha=1.5", "entmax:alpha=learned"])
def test_alibi_incremental_decoding_equals_the_full_forward(data_bin, decoder_attn):
    config = ("sparsemax", decoder_attn, "softmax")
    model, task = build_model(data_bin, ARCH, "--positions", "alibi", "--encoder-attn", config[0],
                              "--decoder-attn", config[1], "--cross-attn", config[2], *NO_DROPOUT)
    model.eval()
    with torch.no_grad():  # sharper attention, so the bias matters and sparse weights have zeros
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight"):
                p.mul_(4)
    check_incremental_equals_full(model, task, config)
    check_padding_invariance(model, task)


def test_alibi_changes_the_decoder(data_bin):
    """ALiBi is not a no-op: the same weights without the bias (NoPE) give other outputs."""
    alibi, task = build_model(data_bin, ARCH, "--positions", "alibi", *NO_DROPOUT)
    nope, _ = build_model(data_bin, ARCH, "--positions", "nope", *NO_DROPOUT)
    nope.load_state_dict(alibi.state_dict())
    alibi.eval(), nope.eval()
    batch = make_batch(task, PAIRS)
    with torch.no_grad():
        a = alibi(batch.src_tokens, batch.src_lengths, batch.prev_output_tokens)[0]
        b = nope(batch.src_tokens, batch.src_lengths, batch.prev_output_tokens)[0]
    assert not torch.allclose(a, b, atol=1e-4)


def test_learned_sets_fairseqs_flags(data_bin):
    model, _ = build_model(data_bin, ARCH, "--positions", "learned")
    assert type(model.encoder.embed_positions).__name__ == "LearnedPositionalEmbedding"
    assert type(model.decoder.embed_positions).__name__ == "LearnedPositionalEmbedding"
    model, _ = build_model(data_bin, ARCH, "--positions", "sinusoidal")
    assert type(model.decoder.embed_positions).__name__ == "SinusoidalPositionalEmbedding"


def test_fairseqs_own_flags_still_work_without_positions(data_bin):
    model, _ = build_model(data_bin, ARCH, "--decoder-learned-pos")
    assert type(model.decoder.embed_positions).__name__ == "LearnedPositionalEmbedding"
    assert type(model.encoder.embed_positions).__name__ == "SinusoidalPositionalEmbedding"
    model, _ = build_model(data_bin, ARCH, "--no-token-positional-embeddings")
    assert model.decoder.embed_positions is None


@pytest.mark.parametrize("flags, message", [
    (["--positions", "alibi", "--decoder-learned-pos"], "contradicts --decoder-learned-pos"),
    (["--positions", "learned", "--no-token-positional-embeddings"], "contradicts --no-token-positional"),
    (["--positions", "nope", "--encoder-learned-pos"], "contradicts --encoder-learned-pos"),
])
def test_contradicting_flags_raise(data_bin, flags, message):
    with pytest.raises(ValueError, match=message):
        build_model(data_bin, ARCH, *flags)


def test_unknown_scheme_is_refused(data_bin):
    with pytest.raises(SystemExit):
        build_model(data_bin, ARCH, "--positions", "rotary")


@pytest.mark.parametrize("positions", ["nope", "alibi"])
def test_train_and_generate_from_the_command_line(data_bin, tmp_path, capsys, positions):
    """fairseq-train a few updates and fairseq-generate with a NoPE / ALiBi model and a scalable spec."""
    spec = _scalable_or_entmax()
    save = tmp_path / "ckpt"
    run_cli("train", train_argv(data_bin, save, "--positions", positions, "--decoder-attn", spec,
                                "--max-update", "3", "--max-epoch", "1"))
    capsys.readouterr()
    run_cli("generate", generate_argv(data_bin, save / "checkpoint_last.pt", "--gen-subset", "test"))
    hyps = parse_generate_output(capsys.readouterr().out).get("H", {})
    assert len(hyps) == 8
    # the checkpoint rebuilds the same scheme
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(save / "checkpoint_last.pt")])
    model = models[0]
    assert model.decoder.embed_positions is None
    dec = [layer.self_attn for layer in model.decoder.layers]
    assert all(isinstance(m.mechanism, ALiBiAttentionMechanism) == (positions == "alibi") for m in dec)
    assert all(m.spec == spec for m in dec)
