"""Shared machinery of the ``Sparse*`` config and model classes (per-role attention).

A ``Sparse*`` config adds three spec fields, ``encoder_attn``, ``decoder_attn`` and
``cross_attn`` (persisted in ``config.json``). A ``Sparse*`` model is the stock transformers
model whose attention modules each hold a :class:`plugin.AttentionMechanism` for their role
as the submodule ``attention_mechanism`` (so learned parameters train, save and load with the
model), with ``config._attn_implementation`` set to :data:`hf_models.attention.PER_MODULE`, under
which the stock attention code calls that mechanism. Projections, caches, masks and
generation stay transformers' own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import initialization as hf_init

import plugin

from .attention import MECHANISM_ATTRIBUTE, PER_MODULE, ROLES, infer_role

logger = logging.getLogger(__name__)

SPEC_FIELDS = tuple(f"{role}_attn" for role in ROLES)
"""Config fields holding the spec of each role: ``encoder_attn``, ``decoder_attn``, ``cross_attn``."""


def _canonical(field: str, value: Any) -> str:
    try:
        return plugin.canonical_spec(value)
    except ValueError as err:
        raise ValueError(f"{field}={value!r}: {err}") from None


class SparseAttentionConfigMixin:
    """Validation and access for the ``encoder_attn`` / ``decoder_attn`` / ``cross_attn`` fields.

    transformers 5 configs are dataclasses, so each config class declares the three fields
    itself (a mixin's annotations are not dataclass fields); this mixin canonicalizes them
    with :func:`plugin.canonical_spec` (raising ValueError for an invalid spec).
    """

    def __post_init__(self, **kwargs: Any) -> None:
        self.validate_attention_specs()
        super().__post_init__(**kwargs)  # type: ignore[misc]
        # a stock config.json sets model_type on the instance; ours is the class's ("sparse_bart", ...)
        vars(self).pop("model_type", None)

    @classmethod
    def stock_model_type(cls) -> str:
        """``model_type`` of the stock config this class extends (``"bart"`` for ``SparseBartConfig``)."""
        for base in cls.__mro__[1:]:
            if not issubclass(base, SparseAttentionConfigMixin) and getattr(base, "model_type", ""):
                return base.model_type
        return ""

    @classmethod
    def get_config_dict(cls, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' ``get_config_dict``, reading a stock config (``model_type="bart"``) as ours.

        Converting a stock checkpoint is what these classes are for, so transformers' warning
        about a model-type mismatch is replaced by an info message.
        """
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)  # type: ignore[misc]
        if config_dict.get("model_type") == cls.stock_model_type():
            logger.info("reading a %r config as %r", config_dict["model_type"], cls.model_type)  # type: ignore[attr-defined]
            config_dict = dict(config_dict, model_type=cls.model_type)  # type: ignore[attr-defined]
        return config_dict, kwargs

    def validate_attention_specs(self) -> None:
        """Canonicalize the three spec fields in place; ValueError names the field."""
        for field in SPEC_FIELDS:
            setattr(self, field, _canonical(field, getattr(self, field)))

    def role_spec(self, role: str) -> str:
        """The spec of ``role`` (``"encoder"``, ``"decoder"`` or ``"cross"``)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        return getattr(self, f"{role}_attn")


def _num_heads(module: nn.Module) -> int:
    for attr in ("num_heads", "n_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the number of heads of {type(module).__name__} (num_heads / n_heads)")


class SparseAttentionModelMixin:
    """Per-role attention mechanisms for a stock transformers model class.

    A subclass lists ``_attention_module_classes`` (the family's attention modules) and puts
    this mixin first in its bases; construction then validates the config's specs, selects
    :data:`~hf_models.attention.PER_MODULE` and gives every attention module its
    ``attention_mechanism``.
    """

    _attention_module_classes: tuple[type[nn.Module], ...] = ()
    config: Any

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        _prepare_config(config, type(self))
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        self._attach_attention_mechanisms()

    # -- mechanisms

    def attention_modules(self) -> Iterator[tuple[str, nn.Module, str]]:
        """``(name, module, role)`` of every attention module of the model."""
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(module, self._attention_module_classes):
                yield name, module, infer_role(module)

    def attention_mechanisms(self) -> dict[str, plugin.AttentionMechanism]:
        """The :class:`plugin.AttentionMechanism` of every attention module, by module name."""
        return {name: getattr(m, MECHANISM_ATTRIBUTE) for name, m, _ in self.attention_modules()}

    def _attach_attention_mechanisms(self, roles: tuple[str, ...] = ROLES) -> None:
        for _, module, role in self.attention_modules():
            if role not in roles:
                continue
            mech = _build_mechanism(self.config.role_spec(role), _num_heads(module), role)
            reference = next(module.parameters(), None)
            if reference is not None:
                mech = mech.to(device=reference.device, dtype=reference.dtype)
            setattr(module, MECHANISM_ATTRIBUTE, mech)

    def set_attention_specs(self, **specs: str) -> None:
        """Change the mechanism of some roles, e.g. ``model.set_attention_specs(cross_attn="sparsemax")``.

        The config is updated (so ``save_pretrained`` keeps it) and the mechanisms of those roles
        are rebuilt; new trainable parameters start from their defaults.
        """
        unknown = sorted(set(specs) - set(SPEC_FIELDS))
        if unknown:
            raise ValueError(f"set_attention_specs: unknown field(s) {unknown}; valid: {', '.join(SPEC_FIELDS)}")
        for field, value in specs.items():
            setattr(self.config, field, _canonical(field, value))
        self._attach_attention_mechanisms(tuple(f[: -len("_attn")] for f in specs))

    # -- transformers hooks

    def set_attn_implementation(self, attn_implementation: Any, allow_all_kernels: bool = False) -> None:
        """Only :data:`~hf_models.attention.PER_MODULE` applies; change mechanisms with :meth:`set_attention_specs`."""
        if attn_implementation != PER_MODULE:
            raise ValueError(_implementation_error(type(self), attn_implementation))
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)  # type: ignore[misc]

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialization, then the mechanisms' own parameters and buffers.

        ``from_pretrained`` builds the model on the meta device, then gives every parameter the
        checkpoint lacks (converting a stock checkpoint: a learned alpha) and every non-persistent
        buffer an uninitialized tensor, and expects ``initialize_weights`` to fill them.
        transformers' ``_init_weights`` does not know the mechanisms, so their tensors are copied
        from a freshly built mechanism of the same spec; loaded ones are left alone
        (``transformers.initialization.copy_`` skips tensors marked as loaded).
        """
        super().initialize_weights()  # type: ignore[misc]
        fresh: dict[tuple[str, Any], dict[str, torch.Tensor]] = {}
        for module in self.modules():  # type: ignore[attr-defined]
            if not isinstance(module, plugin.AttentionMechanism):
                continue
            key = (module.spec, module.num_heads)
            if key not in fresh:
                built = _build_mechanism(module.spec, module.num_heads, module.role)
                fresh[key] = dict(built.named_parameters()) | dict(built.named_buffers())
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                if tensor.device.type != "meta":
                    hf_init.copy_(tensor, fresh[key][name].to(tensor.dtype))


def _build_mechanism(spec: str, num_heads: int | None, role: str | None) -> plugin.AttentionMechanism:
    # on the CPU with real data even inside from_pretrained's meta-device context: a mechanism may
    # compute tables at construction (continuous attention's basis), which meta tensors cannot hold
    with torch.device("cpu"):
        return plugin.AttentionMechanism(spec, num_heads=num_heads, role=role)


def _implementation_error(model_class: type, requested: Any) -> str:
    return (
        f"{model_class.__name__} runs the per-role mechanisms of its config (encoder_attn, decoder_attn, cross_attn) "
        f"and does not take attn_implementation={requested!r}. Choose mechanisms with from_pretrained(path, "
        f"encoder_attn=..., decoder_attn=..., cross_attn=...) or model.set_attention_specs(...). For attention "
        f"weights pass output_attentions=True to forward() or generate() (not to the config)."
    )


def _prepare_config(config: Any, model_class: type) -> None:
    if not isinstance(config, SparseAttentionConfigMixin):
        config_class = getattr(model_class, "config_class", None)
        raise TypeError(
            f"{model_class.__name__} needs a {getattr(config_class, '__name__', 'Sparse*Config')} "
            f"(with encoder_attn/decoder_attn/cross_attn), got {type(config).__name__}; convert a stock checkpoint "
            f"with {model_class.__name__}.from_pretrained(path, cross_attn=...)"
        )
    config.validate_attention_specs()
    if config._attn_implementation not in (None, PER_MODULE):
        raise ValueError(_implementation_error(model_class, config._attn_implementation))
    config._attn_implementation = PER_MODULE
