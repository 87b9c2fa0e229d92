"""``SparseLlamaForCausalLM``: a chosen mechanism with RoPE, NoPE or ALiBi positions."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForCausalLM

import hf_models
import plugin
from hf_models import SparseLlamaConfig, SparseLlamaForCausalLM
from plugin.positions import ALiBiAttentionMechanism, alibi_slopes

from .tiny import config_kwargs

TOL = dict(rtol=1e-4, atol=1e-5)


def _model(positions: str, spec: str = "entmax:alpha=1.5", seed: int = 0) -> SparseLlamaForCausalLM:
    torch.manual_seed(seed)
    config = SparseLlamaConfig(**config_kwargs("llama"), decoder_attn=spec, positions=positions)
    return SparseLlamaForCausalLM(config).eval()


def _ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_unknown_positions_raise():
    with pytest.raises(ValueError, match="positions='rotary'.*valid choices: rope, nope, alibi"):
        SparseLlamaConfig(**config_kwargs("llama"), positions="rotary")


@pytest.mark.parametrize("positions", ["nope", "alibi"])
def test_position_free_schemes_ignore_position_ids(positions):
    model, ids = _model(positions), _ids()
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, position_ids=torch.arange(9).expand(2, 9) * 3 + 50).logits
    assert_close(a, b)
    assert not any("rotary" in name for name in model.state_dict())


def test_rope_depends_on_position_ids():
    model, ids = _model("rope"), _ids()
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, position_ids=torch.arange(9).expand(2, 9) * 3).logits  # other distances
    assert not torch.allclose(a, b, atol=1e-4)


def test_rope_equals_the_stock_llama():
    model, ids = _model("rope", spec="softmax"), _ids()
    stock = LlamaForCausalLM(hf_models.llama.LlamaConfig(**config_kwargs("llama"))).eval()
    stock.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close(model(ids).logits, stock(ids).logits, **TOL)


def test_alibi_mechanisms_carry_the_papers_slopes():
    model = _model("alibi")
    mechs = hf_models.attention_mechanisms(model)
    assert len(mechs) == 2
    for mech in mechs.values():
        assert isinstance(mech, ALiBiAttentionMechanism) and mech.spec == "entmax:alpha=1.5"
        assert mech.slopes.tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])


def test_alibi_is_not_nope():
    alibi, nope, ids = _model("alibi"), _model("nope"), _ids()
    nope.load_state_dict(alibi.state_dict())
    with torch.no_grad():
        assert not torch.allclose(alibi(ids).logits, nope(ids).logits, atol=1e-4)


def test_alibi_first_layer_weights_equal_a_hand_computed_reference():
    """Layer 0's attention weights against q k^T / sqrt(d) - m (i - j), masked causally, normalized."""
    model, ids = _model("alibi", spec="sparsemax"), _ids(batch=1, length=6)
    layer = model.model.layers[0]
    captured = {}
    attn = layer.self_attn
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: captured.update(h=kwargs["hidden_states"]),
                                      with_kwargs=True)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    hook.remove()
    h = captured["h"]
    q = attn.q_proj(h).view(1, 6, 4, 4).transpose(1, 2)
    k = attn.k_proj(h).view(1, 6, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    bias = -alibi_slopes(4).float()[:, None, None] * (i - j)
    scores = (q @ k.transpose(-1, -2)) / 2.0 + bias
    expected = plugin.sparsemax(scores.masked_fill(j > i, float("-inf")), dim=-1)
    assert_close(out.attentions[0], expected, **TOL)


@pytest.mark.parametrize("positions", ["nope", "alibi", "rope"])
@pytest.mark.parametrize("spec", ["softmax", "entmax:alpha=1.5", "entmax:alpha=learned", "scalable_entmax:alpha=1.5"])
def test_cached_decoding_equals_the_full_forward(positions, spec):
    model, ids = _model(positions, spec), _ids()
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :4], past_key_values=cache, use_cache=True).logits]
        for t in range(4, 9):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)  # logits of size ~5: float32 sums in other orders


@pytest.mark.parametrize("positions", ["nope", "alibi"])
def test_left_padding_leaves_the_real_tokens_unchanged(positions):
    model, ids = _model(positions), _ids(batch=1, length=7)
    padded = torch.cat([torch.full((1, 3), 1), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(ids).logits
        together = model(padded, attention_mask=mask).logits[:, 3:]
    assert_close(together, alone, **TOL)


@pytest.mark.parametrize("positions", ["nope", "alibi"])
def test_generate_matches_step_by_step_greedy(positions):
    model, ids = _model(positions), _ids(batch=1, length=5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("positions", ["nope", "alibi"])
def test_save_and_load_round_trip(tmp_path, positions):
    model, ids = _model(positions, spec="scalable_entmax:alpha=learned"), _ids()
    with torch.no_grad():
        for mech in hf_models.attention_mechanisms(model).values():
            for p in mech.parameters():
                p.copy_(torch.randn(p.shape))  # learned alphas away from their start
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    for loader in (SparseLlamaForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is SparseLlamaForCausalLM and loaded.config.positions == positions
        kinds = {type(m) for m in hf_models.attention_mechanisms(loaded).values()}
        assert kinds == {ALiBiAttentionMechanism if positions == "alibi" else plugin.AttentionMechanism}
        with torch.no_grad():
            assert_close(loaded(ids).logits, expected, **TOL)
