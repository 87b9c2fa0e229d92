"""The transformers-signature adapter: every registered variant as an ``attn_implementation``.

transformers 5 dispatches attention by name: each attention module calls
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)`` with
``(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)`` and builds the
mask with ``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``. This module registers
every variant of the core registry under its name in both interfaces, and any parameterized
spec (``"entmax:alpha=1.3"``) on demand. The function only translates shapes, masks and caches
and calls :class:`plugin.AttentionMechanism`; nothing numerical happens here.

Two kinds of names are registered:

* a spec string (``"sparsemax"``, ``"entmax:alpha=1.3"``, ``"fusedmax:lam=0.5"``): every attention
  module of the model runs that mechanism (without trainable parameters: a spec with them,
  ``"entmax:alpha=learned"``, asked as ``attn_implementation`` sparsifies the model instead,
  :mod:`hf_models.per_module`);
* :data:`PER_MODULE` (``"per_module_mechanism"``): each attention module runs the
  :class:`plugin.AttentionMechanism` it holds as ``module.attention_mechanism``. The
  ``Sparse*`` model classes of this package and :func:`hf_models.sparsify` (any model) use it
  for per-role mechanisms, learned parameters and schedules.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

import plugin

from . import compat

logger = logging.getLogger(__name__)

PER_MODULE = "per_module_mechanism"
"""``attn_implementation`` name under which each attention module runs its own ``attention_mechanism``."""

MECHANISM_ATTRIBUTE = "attention_mechanism"
"""Name of the :class:`plugin.AttentionMechanism` submodule that the ``Sparse*`` models add to attention modules."""

ROLES = ("encoder", "decoder", "cross")

CONFIG_FIELD = "attention_spec"
"""Config attribute recording a spec chosen as ``attn_implementation``.

transformers does not write ``attn_implementation`` to ``config.json``; this attribute is
written, and a model loaded without an explicit ``attn_implementation`` (with ``hf_models``
imported) runs the recorded spec again.
"""

_LOCK = threading.Lock()
_SPEC_OF_NAME: dict[str, str] = {}  # registered attn_implementation name -> canonical spec (PER_MODULE -> "")


# ----------------------------------------------------------------------------- registration


def _check_generic_spec(spec: str) -> None:
    """Raise if ``spec`` cannot run as a parameter-free ``attn_implementation``."""
    with torch.device("cpu"):  # may run inside from_pretrained's meta-device context
        probe = plugin.AttentionMechanism(spec, num_heads=1)
    if probe.learnable:
        raise ValueError(
            f"attention spec {spec!r}: this mechanism has trainable parameters (for example a learned alpha), "
            f"which a shared attn_implementation name has no place to keep. Give each attention module its own "
            f"mechanism with hf_models.sparsify(model, {spec!r}) (what from_pretrained(..., "
            f"attn_implementation={spec!r}) does), or use a fixed value such as 'entmax:alpha=1.5'."
        )


def register_spec(spec: str) -> str:
    """Register ``spec`` as an ``attn_implementation`` name and return the name.

    The name is the canonical form of the spec, e.g. ``register_spec("entmax:alpha = 1.30")``
    returns ``"entmax:alpha=1.3"``. Every variant's plain name is registered when ``hf_models``
    is imported, and ``from_pretrained(..., attn_implementation="entmax:alpha=1.3")`` registers a
    parameterized spec on demand; call this function to register one explicitly (for example
    before setting ``config._attn_implementation`` by hand).

    Parameters
    ----------
    spec : a spec string of the core registry (``plugin.variants()``), with fixed parameters.

    Raises
    ------
    ValueError
        if the spec is invalid (unknown variant, parameter or value), has trainable parameters
        (``alpha=learned``), or its name collides with transformers' special dispatch.
    """
    name = plugin.canonical_spec(spec)
    if name in _SPEC_OF_NAME:
        return name
    bad = [s for s in compat.RESERVED_SUBSTRINGS if s in name]
    if bad or name in compat.TRANSFORMERS_NAMES:
        raise ValueError(
            f"attention spec {spec!r} cannot be an attn_implementation name: transformers gives names containing "
            f"{', '.join(repr(s) for s in compat.RESERVED_SUBSTRINGS)} their own dispatch (found {bad or name!r})"
        )
    _check_generic_spec(name)
    _register(name, name)
    return name


def _register(name: str, spec: str) -> None:
    with _LOCK:
        compat.register_attention(name, sparse_attention_forward, sparse_attention_mask)
        _SPEC_OF_NAME[name] = spec


def register_variants() -> list[str]:
    """Register every variant of the core registry under its plain name (idempotent).

    Variants whose defaults have trainable parameters, or whose names transformers reserves,
    are skipped (with a log message); they remain reachable through the ``Sparse*`` classes.
    Returns the names registered.
    """
    names = []
    for name in sorted(plugin.variants()):
        try:
            names.append(register_spec(name))
        except ValueError as err:  # learned by default, or a reserved name
            logger.info("not registering %r as an attn_implementation: %s", name, err)
        except (TypeError, RuntimeError) as err:  # a variant that fails to build must not break the import
            logger.warning("not registering %r as an attn_implementation (building it failed: %r)", name, err)
    if PER_MODULE not in _SPEC_OF_NAME:
        _register(PER_MODULE, "")
    return names


def registered_names() -> list[str]:
    """All ``attn_implementation`` names this package has registered (variants, specs, :data:`PER_MODULE`)."""
    return sorted(_SPEC_OF_NAME)


def is_sparse_implementation(name: Any) -> bool:
    """Whether ``name`` is an ``attn_implementation`` registered by this package."""
    return isinstance(name, str) and name in _SPEC_OF_NAME


# ----------------------------------------------------------------------------- the mask function


def sparse_attention_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """The ``AttentionMaskInterface`` function of our names: transformers' boolean ``sdpa_mask``.

    Returns a bool tensor (B, 1, Lq, Lk), True = attend, or None where no mask is needed: a
    bidirectional mask without padding, or a purely causal one, whose causality
    :func:`sparse_attention_forward` then applies from ``module.is_causal`` (as a flag, which
    lets fast paths skip the masked half instead of reading a mask).
    """
    return compat.boolean_mask(*args, **kwargs)


# ----------------------------------------------------------------------------- the attention function


def infer_role(module: nn.Module) -> str:
    """The role of an attention module: ``"encoder"``, ``"decoder"`` (causal self-attention) or ``"cross"``.

    Read from the attributes transformers' attention modules carry (:func:`hf_models.compat.attention_role`).
    """
    return compat.attention_role(module)


_SHARED: dict[tuple[str, str, int, str], plugin.AttentionMechanism] = {}


@torch.compiler.assume_constant_result
def _shared_mechanism_key(spec: str, role: str, num_heads: int, device: str) -> tuple[str, str, int, str]:
    """Build (once) the parameter-free mechanism of (spec, role, heads, device), shared by the modules
    that use it, and return its key in ``_SHARED``. Under ``torch.compile`` this runs when the call is
    traced, outside the graph (no module is built inside the traced function)."""
    key = (spec, role, num_heads, device)
    if key not in _SHARED:
        with torch.device("cpu"):
            mech = plugin.AttentionMechanism(spec, num_heads=num_heads, role=role)
        if mech.learnable:  # registered names are checked; a hand-set config may still get here
            _check_generic_spec(spec)
        with _LOCK:
            _SHARED[key] = mech.to(device)
    return key


def _weights_requested(kwargs: dict[str, Any]) -> bool:
    """Whether the caller collects attention weights (``output_attentions=True``).

    Some modules consume ``output_attentions`` themselves (GPT-2), so the flag is also read from
    transformers' output collector, which is active while a model records its attentions.
    """
    return bool(kwargs.get("output_attentions")) or compat.collecting_attentions()


def _translate_mask(
    attention_mask: Tensor | None, position_bias: Tensor | None
) -> Tensor | None:
    """transformers' mask (+ T5's position bias) -> the core's mask argument.

    bool masks (True = attend) pass unchanged; float masks are additive, with entries at the
    dtype's minimum (transformers' ``eager_mask`` convention) meaning "masked", turned into
    ``-inf`` so that fully masked rows give zeros. A position bias is added to the scores of
    the allowed entries.
    """
    allowed: Tensor | None = None
    additive: Tensor | None = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            allowed = attention_mask
        elif attention_mask.is_floating_point():
            allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
            additive = attention_mask
        else:
            raise ValueError(
                f"attention_mask must be a bool (True = attend) or float (additive) tensor, got {attention_mask.dtype}"
            )
    if position_bias is not None:
        additive = position_bias if additive is None else additive + position_bias
    if additive is None:
        return allowed
    if allowed is None:
        return additive
    return additive.masked_fill(~allowed, float("-inf"))


def sparse_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature over :class:`plugin.AttentionMechanism`.

    Parameters
    ----------
    module : the calling attention module; its ``config._attn_implementation`` selects the
        mechanism (a spec, or :data:`PER_MODULE` for ``module.attention_mechanism``), and
        ``is_causal`` / ``is_decoder`` / ``is_cross_attention`` give the role.
    query : (B, H, Lq, D).
    key, value : (B, Hkv, Lk, D), Hkv dividing H (grouped-query attention); with a KV cache
        Lk covers the cached positions and the queries are the last Lq positions.
    attention_mask : None, a bool (B or 1, 1, Lq, Lk) mask (True = attend) as built by
        :func:`sparse_attention_mask`, or an additive float mask.
    dropout : dropout on the attention weights (transformers passes 0.0 in eval mode).
    scaling : score scale (None = 1/sqrt(D); T5 passes 1.0).
    **kwargs : ``position_bias`` (T5, added to the scores), ``is_causal`` (overrides
        ``module.is_causal``), ``output_attentions``; the rest is ignored.

    Returns
    -------
    attn_output : (B, Lq, H, D), contiguous.
    attn_weights : (B, H, Lq, Lk) when attentions are requested (``output_attentions``) and
        the mechanism has discrete weights, else None.
    """
    implementation = compat.attn_implementation(getattr(module, "config", None))
    if implementation == PER_MODULE:
        mech = getattr(module, MECHANISM_ATTRIBUTE, None)
        if not isinstance(mech, plugin.AttentionMechanism):
            raise ValueError(
                f"attn_implementation={PER_MODULE!r} runs the mechanism each attention module holds as "
                f"'{MECHANISM_ATTRIBUTE}', and {type(module).__name__} has none: give the model its mechanisms with "
                f"hf_models.sparsify(model, spec) (or build it with a Sparse* class of hf_models), or choose a spec "
                f"such as attn_implementation='sparsemax'"
            )
    else:
        spec = _SPEC_OF_NAME.get(implementation) if isinstance(implementation, str) else None
        if not spec:
            raise ValueError(
                f"sparse_attention_forward was called for attn_implementation={implementation!r}, which is not a "
                f"registered spec; valid choices: {', '.join(registered_names())}"
            )
        mech = _SHARED[_shared_mechanism_key(spec, infer_role(module), query.shape[1], str(query.device))]
        if mech.training != module.training:
            mech.train(module.training)

    position_bias = kwargs.get("position_bias")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    # As in transformers' SDPA integration, causality comes from the module only when no mask is
    # given (an explicit mask already holds it) and the query has more than one row (a single
    # query row, cached decoding, sees every cached key).
    q_len = query.shape[2]
    causal = bool(is_causal) and attention_mask is None and q_len > 1
    if causal and key.shape[2] > q_len:
        # sdpa_mask leaves out the mask with more keys than queries only at the prefill of a static
        # cache, whose later slots are still empty: attend to the first q_len keys (as SDPA's does)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    mask = _translate_mask(attention_mask, position_bias)
    want_weights = _weights_requested(kwargs)
    result = mech(query, key, value, mask=mask, causal=causal, scale=scaling, dropout_p=dropout,
                  return_weights=want_weights)
    out, weights = result if want_weights else (result, None)
    return out.transpose(1, 2).contiguous(), weights


# ----------------------------------------------------------------------------- model checks


def supports_attention_interface(model_class: type) -> bool:
    """Whether ``model_class`` routes its attention through transformers' ``AttentionInterface``.

    Uses transformers' own test (:func:`hf_models.compat.routes_attention_through_interface`):
    attention modules that never call the interface ignore ``attn_implementation``.
    """
    return compat.routes_attention_through_interface(model_class)


def _unknown_name_error(name: str, reason: str) -> ValueError:
    builtin = [k for k in compat.attention_names() if k not in _SPEC_OF_NAME]
    return ValueError(
        f"attn_implementation={name!r} is neither one of transformers' implementations ({', '.join(builtin)}) "
        f"nor a valid sparse-attention spec ({reason}); sparse variants: {', '.join(sorted(plugin.variants()))}, "
        f"with parameters as in 'entmax:alpha=1.3'"
    )


def resolve_implementation(name: Any, model_class: type | None = None) -> Any:
    """Check a requested ``attn_implementation`` before transformers does.

    Registers a not-yet-registered spec (``"entmax:alpha=1.3"``) on demand, raises a clear
    ValueError for an unknown name, a spec with trainable parameters, or a model class whose
    attention does not go through the ``AttentionInterface`` (which would silently run its own
    softmax). Names of transformers itself pass through unchanged.
    """
    if not isinstance(name, str):
        return name
    if not compat.is_registered_attention_name(name):
        try:
            name = register_spec(name)
        except ValueError as err:
            if any(s in name for s in compat.RESERVED_SUBSTRINGS) or name.startswith("paged"):
                return name  # transformers' own kinds of names: leave its error to transformers
            if "trainable parameters" in str(err):
                raise
            raise _unknown_name_error(name, str(err)) from None
    if is_sparse_implementation(name) and model_class is not None and not supports_attention_interface(model_class):
        raise ValueError(
            f"{model_class.__name__} does not route its attention through transformers' AttentionInterface, so "
            f"attn_implementation={name!r} would be ignored and softmax would run. Families that do include BERT, "
            f"RoBERTa, BART, Marian, mBART, Pegasus, T5, GPT-2 and Llama."
        )
    return name


def _get_correct_attn_implementation(self: PreTrainedModel, requested_attention: str | None,
                                     is_init_check: bool = False) -> str:
    from . import per_module, sparse  # they import this module

    if not isinstance(self, sparse.SparseAttentionModelMixin):
        per_module_choice = per_module.check_implementation(self, requested_attention, is_init_check)
        if per_module_choice is not None:
            return compat.stock_implementation_check(self, per_module_choice, is_init_check)
    from_config = requested_attention is None
    if from_config:  # nothing requested: the spec a saved config.json carries, if any
        requested_attention = saved_spec(self.config)
    try:
        requested_attention = resolve_implementation(requested_attention, type(self))
    except ValueError as err:
        if not from_config or requested_attention is None:
            raise
        raise ValueError(f"config field {CONFIG_FIELD!r}={requested_attention!r}: {err}") from None
    chosen = compat.stock_implementation_check(self, requested_attention, is_init_check)
    if chosen == PER_MODULE:  # Sparse* configs persist their per-role fields instead
        return chosen
    if is_sparse_implementation(chosen):
        setattr(self.config, CONFIG_FIELD, chosen)
    elif getattr(self.config, CONFIG_FIELD, None) is not None:
        setattr(self.config, CONFIG_FIELD, None)
    return chosen


def saved_spec(config: Any) -> str | None:
    """The spec in ``config.attention_spec`` (:data:`CONFIG_FIELD`), None when the field is absent or null.

    An empty or non-string value raises ValueError naming the field and the valid choices
    (it would otherwise load transformers' default attention, softmax, without a word).
    """
    value = getattr(config, CONFIG_FIELD, None)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"config field {CONFIG_FIELD!r}={value!r} is not an attention spec; valid choices: "
            f"{', '.join(sorted(plugin.variants()))} (with parameters, e.g. 'entmax:alpha=1.3'), or null / no field "
            f"for transformers' default attention"
        )
    return value


def install_implementation_check() -> None:
    """Wrap ``PreTrainedModel.get_correct_attn_implementation`` (idempotent).

    transformers validates ``attn_implementation`` there, at model construction and in
    ``set_attn_implementation``; the wrapper first runs :func:`resolve_implementation`
    (on-demand spec registration and the clear errors), then transformers' own check, and
    records a chosen spec in ``config.attention_spec`` (:data:`CONFIG_FIELD`) so that
    ``save_pretrained`` keeps it.
    """
    compat.install_implementation_check(_get_correct_attn_implementation)
