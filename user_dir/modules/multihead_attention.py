"""fairseq's multi-head attention with the attention computed by a registered mechanism.

:class:`PluggableMultiheadAttention` keeps fairseq's projections (``q_proj``, ``k_proj``,
``v_proj``, ``out_proj``: a stock checkpoint loads), its incremental-decoding cache (the
``prev_key`` / ``prev_value`` / ``prev_key_padding_mask`` buffers of shape
``(batch, heads, length, head_dim)`` and ``(batch, length)``, reordered by fairseq's own
``reorder_incremental_state``) and its beam-shared encoder states, and replaces the
score -> probability -> context step by ``plugin.AttentionMechanism``. It never takes
fairseq's fast paths (``F.multi_head_attention_forward``, xformers), which would compute
softmax whatever mechanism was asked for.
"""

from __future__ import annotations

import logging

import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor

import plugin

from .. import compat
from ..compat import IncrementalState

logger = logging.getLogger(__name__)


class PluggableMultiheadAttention(MultiheadAttention):
    """Multi-head attention whose normalizer is any registered mechanism.

    Parameters
    ----------
    embed_dim, num_heads, kdim, vdim, dropout, bias, add_bias_kv, add_zero_attn,
    self_attention, encoder_decoder_attention, q_noise, qn_block_size :
        as in ``fairseq.modules.MultiheadAttention``; ``dropout`` is the attention dropout,
        applied to the attention weights by the mechanism.
    spec : a spec string of the core registry (``"sparsemax"``, ``"entmax:alpha=learned"``,
        ``"fusedmax:lam=0.5"``, ``"sparsemax+continuous_softmax"``...).
    role : the label reported by ``plugin.record_calls()`` (``"encoder"``, ``"decoder"``,
        ``"cross"``).
    schedule : a schedule string (``plugin.schedule``) moving a parameter of ``spec`` with
        fairseq's update count, which :meth:`set_num_updates` receives from the trainer.

    The mechanism is the submodule ``mechanism``: its parameters (a learned alpha per head,
    a continuous-attention head) are trained, checkpointed and restored with the model.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        spec: str = "softmax",
        role: str | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        self_attention: bool = False,
        encoder_decoder_attention: bool = False,
        dictionary=None,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
        xformers_att_config: str | None = None,
        schedule: str | None = None,
    ) -> None:
        if xformers_att_config:
            raise ValueError(
                f"xformers_att_config={xformers_att_config!r}: the attention of this layer is computed by the "
                f"plugin mechanism {spec!r}; xformers would compute softmax. Leave the xformers options unset."
            )
        super().__init__(
            embed_dim,
            num_heads,
            kdim=kdim,
            vdim=vdim,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            self_attention=self_attention,
            encoder_decoder_attention=encoder_decoder_attention,
            dictionary=dictionary,
            q_noise=q_noise,
            qn_block_size=qn_block_size,
        )
        self.mechanism = plugin.AttentionMechanism(spec, num_heads=num_heads, role=role, schedule=schedule)
        # fairseq's name, so --retain-dropout-modules lists stay those of the stock model
        compat.name_dropouts(self, "MultiheadAttention")

    @property
    def spec(self) -> str:
        """The canonical spec string of the mechanism."""
        return self.mechanism.spec

    @property
    def role(self) -> str | None:
        return self.mechanism.role

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq's per-update hook (the model passes it to every submodule): the schedule's step."""
        if self.mechanism.schedule is not None:
            self.mechanism.set_schedule_step(int(num_updates))

    def forward(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None = None,
        incremental_state: IncrementalState | None = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Tensor | None = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """fairseq's signature; inputs are Time x Batch x Channel.

        Parameters
        ----------
        query : (tgt_len, bsz, embed_dim).
        key, value : (src_len, kv_bsz, kdim / vdim), or None when cached (``static_kv``).
        key_padding_mask : (kv_bsz, src_len), nonzero / True at padding.
        incremental_state : fairseq's decoding cache (this module's buffer holds
            ``prev_key``, ``prev_value`` of shape (kv_bsz, heads, length, head_dim) and
            ``prev_key_padding_mask`` (kv_bsz, length)).
        need_weights, need_head_weights : return the weights averaged over heads
            (bsz, tgt_len, src_len), or per head (heads, bsz, tgt_len, src_len).
        static_kv : the keys are the encoder states, computed once and reused.
        attn_mask : (tgt_len, src_len) additive float mask (``-inf`` = masked, as fairseq's
            future mask) or a bool / byte mask (True / nonzero = masked); also
            (bsz * heads, tgt_len, src_len).
        before_softmax : not supported (it hands unnormalized scores to the caller, which
            would normalize them with softmax); raises ``ValueError``.

        Returns
        -------
        ``(output (tgt_len, bsz, embed_dim), weights or None)``.
        """
        if before_softmax:
            raise ValueError(
                f"before_softmax=True returns unnormalized scores for the caller to normalize with softmax; "
                f"this attention normalizes with {self.spec!r} and does not support it"
            )
        if need_head_weights:
            need_weights = True
        tgt_len, bsz, embed_dim = query.size()
        if not self.skip_embed_dim_check and embed_dim != self.embed_dim:
            raise ValueError(f"query embedding dimension {embed_dim} != {self.embed_dim}")

        saved_state: dict[str, Tensor | None] | None = None
        if incremental_state is not None:
            saved_state = compat.input_buffer(self, incremental_state)
            if "prev_key" in saved_state and static_kv:
                # encoder keys and values were projected at the first step: reuse them
                key = value = None

        q, k, v, key_padding_mask = self._project(
            query, key, value, key_padding_mask, bsz, incremental=incremental_state is not None
        )
        q = q * self.scaling
        if self.bias_k is not None and k is not None and v is not None:  # reused cached keys already hold it
            k, v, key_padding_mask, attn_mask = compat.add_bias_kv(self, k, v, key_padding_mask, attn_mask, bsz)

        heads, head_dim = self.num_heads, self.head_dim
        q = q.contiguous().view(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)  # (bsz, H, T, D)
        kv_bsz = bsz
        if k is not None:
            kv_bsz = k.size(1)
            k = k.contiguous().view(-1, kv_bsz, heads, head_dim).permute(1, 2, 0, 3)  # (kv_bsz, H, S, D)
        if v is not None:
            v = v.contiguous().view(-1, kv_bsz, heads, head_dim).permute(1, 2, 0, 3)

        if incremental_state is not None and saved_state is not None:
            first_step = "prev_key" not in saved_state
            k, v, key_padding_mask, kv_bsz = self._update_cache(saved_state, k, v, key_padding_mask, static_kv)
            incremental_state = compat.set_input_buffer(self, incremental_state, saved_state)
            if first_step and kv_bsz != bsz:
                self.set_incremental_state(incremental_state, "beam_share", {"factor": torch.tensor(bsz // kv_bsz)})
        assert k is not None and v is not None
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None
        if self.add_zero_attn:
            k, v, key_padding_mask, attn_mask = compat.append_zero_attn(self, k, v, key_padding_mask, attn_mask)
        src_len = k.size(2)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (kv_bsz, src_len):
            raise ValueError(
                f"key_padding_mask of shape {tuple(key_padding_mask.shape)} does not match (batch, keys) = "
                f"({kv_bsz}, {src_len})"
            )

        mask = _mechanism_mask(key_padding_mask, attn_mask, kv_bsz, bsz, heads, tgt_len, src_len)
        beam = bsz // kv_bsz
        if beam > 1:
            # Beam-shared encoder states: the keys are stored once per sentence and the `beam`
            # hypotheses of a sentence become extra query rows of it. Every mechanism normalizes
            # each query row on its own, so this equals attending to keys repeated `beam` times.
            if bsz != kv_bsz * beam:
                raise ValueError(f"query batch {bsz} is not a multiple of the key batch {kv_bsz}")
            q = q.reshape(kv_bsz, beam, heads, tgt_len, head_dim).transpose(1, 2).reshape(
                kv_bsz, heads, beam * tgt_len, head_dim
            )
            if mask is not None and mask.size(-2) != 1:  # (1, 1, T, S) or (kv_bsz, 1, T, S)
                mask = mask.repeat(1, 1, beam, 1)

        dropout_p = compat.attention_dropout_p(self)
        # fairseq passes truthy values such as print_alignment's "soft"; the core takes booleans
        need_weights = bool(need_weights)
        result = self.mechanism(q, k, v, mask=mask, scale=1.0, dropout_p=dropout_p, return_weights=need_weights)
        out, weights = result if need_weights else (result, None)

        if beam > 1:
            out = out.reshape(kv_bsz, heads, beam, tgt_len, head_dim).transpose(1, 2).reshape(
                bsz, heads, tgt_len, head_dim
            )
            if weights is not None:
                weights = weights.reshape(kv_bsz, heads, beam, tgt_len, src_len).transpose(1, 2).reshape(
                    bsz, heads, tgt_len, src_len
                )
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, heads * head_dim)
        out = self.out_proj(out)

        if not need_weights or weights is None:
            return out, None
        weights = weights.transpose(1, 0)  # (H, bsz, T, S), fairseq's layout
        if not need_head_weights:
            weights = weights.mean(dim=0)
        return out, weights

    def _project(
        self, query: Tensor, key: Tensor | None, value: Tensor | None, key_padding_mask: Tensor | None,
        bsz: int, incremental: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """The q/k/v projections, as fairseq's MultiheadAttention computes them."""
        if self.self_attention:
            return self.q_proj(query), self.k_proj(query), self.v_proj(query), key_padding_mask
        q = self.q_proj(query)
        if self.encoder_decoder_attention:
            if key is None:
                return q, None, None, key_padding_mask
            if incremental:
                key, key_padding_mask = self._share_beam(key, key_padding_mask, bsz)
            return q, self.k_proj(key), self.v_proj(key), key_padding_mask
        if key is None or value is None:
            raise ValueError("attention without self_attention or encoder_decoder_attention needs key and value")
        return q, self.k_proj(key), self.v_proj(value), key_padding_mask

    def _share_beam(self, key: Tensor, key_padding_mask: Tensor | None, bsz: int) -> tuple[Tensor, Tensor | None]:
        """Keep one copy of the encoder states per sentence when beam search repeated them.

        With ``set_beam_size(beam)`` and encoder states (src_len, bsz, C) holding ``beam``
        consecutive copies of each sentence, the keys and values are computed and cached once
        per sentence. The copies are checked to be identical, so a beam size left over from
        an earlier search never merges different sentences.
        """
        beam = self.beam_size
        if beam <= 1 or key.size(1) != bsz or bsz % beam:
            return key, key_padding_mask
        grouped = key.view(key.size(0), -1, beam, key.size(2))
        if not torch.equal(grouped, grouped[:, :, :1].expand_as(grouped)):
            return key, key_padding_mask
        if key_padding_mask is not None:
            grouped_mask = key_padding_mask.view(-1, beam, key_padding_mask.size(1))
            if not torch.equal(grouped_mask, grouped_mask[:, :1].expand_as(grouped_mask)):
                return key, key_padding_mask
            key_padding_mask = grouped_mask[:, 0]
        return grouped[:, :, 0], key_padding_mask

    def _beam_share_factor(self, incremental_state: IncrementalState | None) -> int:
        """How many hypotheses share each cached sentence of this incremental state (1: none)."""
        shared = self.get_incremental_state(incremental_state, "beam_share")
        factor = shared.get("factor") if shared else None
        return int(factor.item()) if factor is not None else 1

    def reorder_incremental_state(self, incremental_state: IncrementalState | None, new_order: Tensor):
        """Reorder the cache for beam search.

        ``new_order`` (n_hypotheses,) gives, for each new hypothesis, the old hypothesis it
        continues. A beam-shared cache (one entry per sentence) is reordered by sentence:
        beam search keeps hypotheses in groups of ``factor`` per sentence, so new group ``i``
        continues sentence ``new_order[i * factor] // factor``.
        """
        if incremental_state is None:
            return incremental_state
        buffer = compat.input_buffer(self, incremental_state)
        if not buffer:
            return incremental_state
        factor = self._beam_share_factor(incremental_state)
        if factor > 1:
            if new_order.numel() % factor:
                raise ValueError(
                    f"cannot reorder a beam-shared cache (beam {factor}) with {new_order.numel()} hypotheses"
                )
            order = new_order.view(-1, factor)[:, 0] // factor
        else:
            order = new_order
        for name, tensor in buffer.items():
            if tensor is not None:
                buffer[name] = tensor.index_select(0, order)
        return compat.set_input_buffer(self, incremental_state, buffer)

    def _update_cache(
        self,
        saved_state: dict[str, Tensor | None],
        k: Tensor | None,
        v: Tensor | None,
        key_padding_mask: Tensor | None,
        static_kv: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None, int]:
        """Append to (or, with ``static_kv``, reuse) the cached keys, values and padding mask."""
        kv_bsz = k.size(0) if k is not None else None
        prev_key = saved_state.get("prev_key")
        if prev_key is not None:
            kv_bsz = prev_key.size(0)
            if static_kv:
                k = prev_key
            elif k is not None:
                k = torch.cat([prev_key, k], dim=2)
        prev_value = saved_state.get("prev_value")
        if prev_value is not None:
            if static_kv:
                v = prev_value
            elif v is not None:
                v = torch.cat([prev_value, v], dim=2)
        if k is None or v is None or kv_bsz is None:  # also: new keys missing while not static_kv
            raise ValueError("incremental attention step without keys: the cache holds no prev_key/prev_value")
        key_padding_mask = compat.append_prev_key_padding_mask(
            key_padding_mask, saved_state.get("prev_key_padding_mask"), kv_bsz, k.size(2), static_kv
        )
        saved_state["prev_key"] = k.contiguous()
        saved_state["prev_value"] = v.contiguous()
        saved_state["prev_key_padding_mask"] = key_padding_mask
        return k, v, key_padding_mask, kv_bsz

    def upgrade_state_dict_named(self, state_dict: dict[str, Tensor], name: str) -> None:
        """Load stock fairseq attention weights, and weights saved with another mechanism.

        A stock ``transformer`` checkpoint has no mechanism state: a learned alpha (or any
        other mechanism parameter) missing from ``state_dict`` keeps its initial value.
        Mechanism state in ``state_dict`` that this mechanism does not have (the checkpoint
        was trained with another spec, e.g. switched by ``--model-overrides``) is dropped.
        Both are logged.
        """
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name != "" else ""
        if prefix + "q_proj.weight" not in state_dict:
            return
        own = self.mechanism.state_dict(prefix=prefix + "mechanism.")
        for key, tensor in own.items():
            if key not in state_dict:
                logger.info("%s is not in the checkpoint: keeping its initial value (%s)", key, self.spec)
                state_dict[key] = tensor.detach().clone()
        for key in [k for k in state_dict if k.startswith(prefix + "mechanism.") and k not in own]:
            logger.warning("dropping %s from the checkpoint: the mechanism is now %r", key, self.spec)
            del state_dict[key]


def _mechanism_mask(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    kv_bsz: int,
    bsz: int,
    heads: int,
    tgt_len: int,
    src_len: int,
) -> Tensor | None:
    """fairseq's masks as the core's ``mask``: bool (True = attend), or float (added to scores).

    ``key_padding_mask`` (kv_bsz, S) is nonzero at padding. A float ``attn_mask`` made of
    0 and -inf (fairseq's future mask) becomes part of the bool mask; any other float mask
    is kept additive, with the padding folded in as -inf. Bool / byte masks follow
    PyTorch's convention (True = masked). Result broadcastable to (kv_bsz, H, T, S).
    """
    allowed: Tensor | None = None
    if key_padding_mask is not None:
        allowed = ~key_padding_mask.to(torch.bool).view(kv_bsz, 1, 1, src_len)
    if attn_mask is None:
        return allowed
    if attn_mask.dim() == 3:
        if kv_bsz != bsz:
            raise ValueError("a per-batch attn_mask is not supported with beam-shared encoder states")
        attn_mask = attn_mask.view(bsz, heads, tgt_len, src_len)
    elif attn_mask.dim() == 2:
        attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
    else:
        raise ValueError(f"attn_mask must be (tgt_len, src_len) or (bsz * heads, tgt_len, src_len), got "
                         f"{tuple(attn_mask.shape)}")
    if not attn_mask.is_floating_point():
        keep = ~attn_mask.to(torch.bool)
        return keep if allowed is None else allowed & keep
    blocked = torch.isneginf(attn_mask)
    # a 0 / -inf mask becomes a bool one; under torch.compile (no host sync in a graph) it stays
    # additive, which gives the same scores
    if not torch.compiler.is_compiling() and bool(((attn_mask == 0) | blocked).all()):
        return ~blocked if allowed is None else allowed & ~blocked
    if allowed is None:
        return attn_mask
    return torch.where(allowed, attn_mask, torch.full((), float("-inf"), dtype=attn_mask.dtype,
                                                      device=attn_mask.device))
