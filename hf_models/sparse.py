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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import plugin

from . import compat
from .attention import MECHANISM_ATTRIBUTE, PER_MODULE, ROLES, infer_role

if TYPE_CHECKING:  # the mixins are always combined with these classes of transformers
    _ConfigBase = PretrainedConfig
    _ModelBase = PreTrainedModel
else:
    _ConfigBase = _ModelBase = object

logger = logging.getLogger(__name__)

SPEC_FIELDS = tuple(f"{role}_attn" for role in ROLES)
"""Config fields holding the spec of each role: ``encoder_attn``, ``decoder_attn``, ``cross_attn``."""

SCHEDULE_FIELDS = tuple(f"{field}_schedule" for field in SPEC_FIELDS)
"""Config fields holding the schedule of each role (``plugin.schedule``), or None."""

SCHEDULE_STATE_FIELD = "attn_schedule_state"
"""Config attribute that ``save_pretrained`` writes: where each role's schedule stands (step and value)."""


def _canonical(field: str, value: Any) -> str:
    try:
        return plugin.canonical_spec(value)
    except ValueError as err:
        raise ValueError(f"{field}={value!r}: {err}") from None


def _check_schedule_state(state: Any) -> None:
    """``attn_schedule_state`` as ``save_pretrained`` writes it, or None: ValueError naming the field otherwise."""
    if state is None:
        return
    form = (f"expected None or {{role: {{'step': int in [0, 2**63 - 1], 'value': number or None, 'spec': str}}}} "
            f"with role in {', '.join(ROLES)}")
    if not isinstance(state, dict):
        raise ValueError(f"{SCHEDULE_STATE_FIELD}={state!r} is not valid; {form}")
    for role, entry in state.items():
        where = f"{SCHEDULE_STATE_FIELD}[{role!r}]"
        if role not in ROLES:
            raise ValueError(f"{SCHEDULE_STATE_FIELD}: unknown role {role!r}; valid choices: {', '.join(ROLES)}")
        if not isinstance(entry, dict) or set(entry) - {"step", "value", "spec"} or "step" not in entry:
            raise ValueError(f"{where}={entry!r} is not valid; {form}")
        plugin.schedule.check_step(entry["step"], f"{where}['step']")
        value = entry.get("value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value != value or abs(value) == float("inf")):
            raise ValueError(f"{where}['value']={value!r} is not valid; expected a finite number or None")
        if not isinstance(entry.get("spec", ""), str):
            raise ValueError(f"{where}['spec']={entry['spec']!r} is not valid; expected a spec string")


@dataclass(init=False, repr=False, eq=False, kw_only=True)
class SparseAttentionConfigMixin(_ConfigBase):
    """The ``encoder_attn`` / ``decoder_attn`` / ``cross_attn`` fields, their schedules, validation and access.

    Put it first in the bases of a stock config class and set ``model_type``::

        class SparseBartConfig(SparseAttentionConfigMixin, BartConfig):
            model_type = "sparse_bart"

    transformers 5 configs are dataclasses, and this mixin is one too, so its six fields become
    fields of the config class (written to ``config.json``). The spec fields are canonicalized
    with :func:`plugin.canonical_spec` (raising ValueError for an invalid spec). The optional
    ``<role>_attn_schedule`` fields (``encoder_attn_schedule``...) move a parameter of the
    role's spec with the training step (``plugin.schedule``, e.g. ``"cosine:start=1,steps=500"``
    takes entmax's alpha from softmax to the spec's value); they are checked against the spec
    and written in canonical form.
    """

    encoder_attn: str = "softmax"
    decoder_attn: str = "softmax"
    cross_attn: str = "softmax"
    encoder_attn_schedule: str | None = None
    decoder_attn_schedule: str | None = None
    cross_attn_schedule: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.validate_attention_specs()
        super().__post_init__(**kwargs)
        _check_schedule_state(getattr(self, SCHEDULE_STATE_FIELD, None))
        # a stock config.json sets model_type on the instance; ours is the class's ("sparse_bart", ...)
        vars(self).pop("model_type", None)

    @classmethod
    def stock_model_type(cls) -> str:
        """``model_type`` of the stock config this class extends (``"bart"`` for ``SparseBartConfig``)."""
        for base in cls.__mro__[1:]:
            model_type = getattr(base, "model_type", "")
            if not issubclass(base, SparseAttentionConfigMixin) and model_type:
                return str(model_type)
        return ""

    @classmethod
    def get_config_dict(cls, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' ``get_config_dict``, reading a stock config (``model_type="bart"``) as ours.

        Converting a stock checkpoint is what these classes are for, so transformers' warning
        about a model-type mismatch is replaced by an info message.
        """
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == cls.stock_model_type():
            logger.info("reading a %r config as %r", config_dict["model_type"], cls.model_type)
            config_dict = dict(config_dict, model_type=cls.model_type)
        return config_dict, kwargs

    def validate_attention_specs(self) -> None:
        """Canonicalize the three spec fields and their schedules in place; ValueError names the field."""
        for field in SPEC_FIELDS:
            setattr(self, field, _canonical(field, getattr(self, field)))
        for field, spec_field in zip(SCHEDULE_FIELDS, SPEC_FIELDS):
            text = getattr(self, field, None)
            if text:
                setattr(self, field, str(plugin.parse_schedule(text, getattr(self, spec_field), name=field)))
            else:
                setattr(self, field, None)

    def role_schedule(self, role: str) -> str | None:
        """The schedule of ``role``'s mechanism, or None."""
        self.role_spec(role)  # validates the role
        return getattr(self, f"{role}_attn_schedule", None)

    def role_spec(self, role: str) -> str:
        """The spec of ``role`` (``"encoder"``, ``"decoder"`` or ``"cross"``)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        return getattr(self, f"{role}_attn")


class SparseAttentionModelMixin(_ModelBase):
    """Per-role attention mechanisms for a stock transformers model class.

    A subclass sets ``config_class`` (a :class:`SparseAttentionConfigMixin` config) and
    ``_attention_module_classes`` (the family's attention modules), and puts this mixin before
    the stock class in its bases, the stock class last::

        class SparseBartModel(SparseAttentionModelMixin, BartModel):
            config_class = SparseBartConfig
            _attention_module_classes = (BartAttention,)

    Construction then validates the config's specs, selects
    :data:`~hf_models.attention.PER_MODULE` and gives every attention module its
    ``attention_mechanism``. A subclass without a docstring gets one naming the stock class.
    """

    _attention_module_classes: tuple[type[nn.Module], ...] = ()
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        stock = cls.__bases__[-1]  # "class SparseBartModel(..., BartModel)"
        if cls.__doc__ is None and issubclass(stock, nn.Module):
            cls.__doc__ = f":class:`transformers.{stock.__name__}` whose attention runs ``config.<role>_attn``."

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        _prepare_config(config, type(self))
        super().__init__(config, *args, **kwargs)
        self._attach_attention_mechanisms()

    # -- mechanisms

    def attention_modules(self) -> Iterator[tuple[str, nn.Module, str]]:
        """``(name, module, role)`` of every attention module of the model."""
        for name, module in self.named_modules():
            if isinstance(module, self._attention_module_classes):
                yield name, module, infer_role(module)

    def attention_mechanisms(self) -> dict[str, plugin.AttentionMechanism]:
        """The :class:`plugin.AttentionMechanism` of every attention module, by module name."""
        return {name: getattr(m, MECHANISM_ATTRIBUTE) for name, m, _ in self.attention_modules()}

    def _attach_attention_mechanisms(self, roles: tuple[str, ...] = ROLES) -> None:
        for _, module, role in self.attention_modules():
            if role not in roles:
                continue
            mech = _build_mechanism(self.config.role_spec(role), compat.attention_heads(module), role,
                                    self.config.role_schedule(role))
            reference = next(module.parameters(), None)
            if reference is not None:
                mech = mech.to(device=reference.device, dtype=reference.dtype)
            setattr(module, MECHANISM_ATTRIBUTE, mech)

    def set_attention_specs(self, **specs: str | None) -> None:
        """Change the mechanism of some roles, e.g. ``model.set_attention_specs(cross_attn="sparsemax")``.

        Schedules are changed the same way (``cross_attn_schedule="cosine:start=1,steps=500"``;
        None removes one). The config is updated (so ``save_pretrained`` keeps it) and the
        mechanisms of those roles are rebuilt; new trainable parameters start from their defaults.
        """
        valid = SPEC_FIELDS + SCHEDULE_FIELDS
        unknown = sorted(set(specs) - set(valid))
        if unknown:
            raise ValueError(f"set_attention_specs: unknown field(s) {unknown}; valid: {', '.join(valid)}")
        before = {f: getattr(self.config, f, None) for f in valid}
        try:
            for field, value in specs.items():
                setattr(self.config, field, value)
            self.config.validate_attention_specs()
        except ValueError:
            for field, value in before.items():
                setattr(self.config, field, value)
            raise
        roles = {f.split("_attn")[0] for f in specs}
        self._attach_attention_mechanisms(tuple(r for r in ROLES if r in roles))

    # -- schedules

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; the schedules then continue from the loaded step."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        for _, mech in plugin.schedule.scheduled_mechanisms(model):
            mech.set_schedule_step(int(mech.schedule_step))  # the loaded buffer -> the value in use
        return loaded

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``; ``config.json`` also records where each schedule stands.

        The step itself is saved with the weights (each mechanism's ``schedule_step`` buffer),
        so a loaded model continues from the same value; ``attn_schedule_state`` in
        ``config.json`` shows it: ``{role: {"step": ..., "value": ..., "spec": ...}}``.
        """
        state = {}
        for _, module, role in self.attention_modules():
            mech = getattr(module, MECHANISM_ATTRIBUTE)
            if mech.schedule is not None:
                state[role] = {"step": mech.schedule_step_value, "value": mech.scheduled_value(),
                               "spec": mech.current_spec()}
        setattr(self.config, SCHEDULE_STATE_FIELD, state or None)
        return super().save_pretrained(*args, **kwargs)

    # -- transformers hooks

    def set_attn_implementation(self, attn_implementation: Any, allow_all_kernels: bool = False) -> None:
        """Only :data:`~hf_models.attention.PER_MODULE` applies; change mechanisms with :meth:`set_attention_specs`."""
        if attn_implementation != PER_MODULE:
            raise ValueError(_implementation_error(type(self), attn_implementation))
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)


def _build_mechanism(
    spec: str, num_heads: int | None, role: str | None, schedule: str | None = None
) -> plugin.AttentionMechanism:
    # on the CPU with real data even inside from_pretrained's meta-device context: a mechanism may
    # compute tables at construction (continuous attention's basis), which meta tensors cannot hold
    with torch.device("cpu"):
        return plugin.AttentionMechanism(spec, num_heads=num_heads, role=role, schedule=schedule)


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
    requested = compat.attn_implementation(config)
    if requested not in (None, PER_MODULE):
        raise ValueError(_implementation_error(model_class, requested))
    compat.set_attn_implementation(config, PER_MODULE)
