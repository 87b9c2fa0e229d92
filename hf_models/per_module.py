"""Per-module mechanisms for any transformers model: :func:`sparsify`.

The ``Sparse*`` classes (:mod:`hf_models.sparse`) give each attention module of five seq2seq
families its own :class:`plugin.AttentionMechanism`. :func:`sparsify` does the same, in place, for
any model whose attention modules call transformers' ``AttentionInterface`` (BERT, RoBERTa,
ModernBERT, GPT-2, Llama, Qwen, BART, T5, ...): every such module gets the submodule
``attention_mechanism`` and the model's ``config._attn_implementation`` becomes
:data:`~hf_models.attention.PER_MODULE`, under which the stock attention code calls it. Learned
parameters (``entmax:alpha=learned``, one alpha per head) train with the model, schedules follow
:func:`plugin.set_schedule_step`, and both save and load with it.

What is saved: the config field ``sparse_attention`` (:data:`SPARSIFY_FIELD`),
``{"spec": <spec or {role: spec}>, "schedule": <schedule, {role: schedule} or null>}``, goes to
``config.json``; the mechanisms' parameters and each schedule's ``schedule_step`` buffer go to the
weights. ``from_pretrained`` of such a folder (with ``hf_models`` imported) rebuilds the same
mechanisms when the model is constructed (a hook at the end of ``post_init``), loads their
tensors, and continues every schedule from its saved step (a hook at the end of
``initialize_weights``, which ``from_pretrained`` calls once the checkpoint is loaded). A config
without the field builds and loads exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

import plugin

from . import compat
from .attention import CONFIG_FIELD, MECHANISM_ATTRIBUTE, PER_MODULE, ROLES, infer_role, supports_attention_interface

SPARSIFY_FIELD = "sparse_attention"
"""Config attribute written by :func:`sparsify` (and saved in ``config.json``): ``{"spec": ..., "schedule": ...}``."""

_ABSENT_ROLE_SPEC = "softmax"


# ----------------------------------------------------------------------------- finding the modules


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(name, module, role)`` of every attention module of ``model`` that calls the ``AttentionInterface``.

    For a ``Sparse*`` model, its own :meth:`~hf_models.SparseAttentionModelMixin.attention_modules`.
    """
    from .sparse import SparseAttentionModelMixin

    if isinstance(model, SparseAttentionModelMixin):
        yield from model.attention_modules()
        return
    for name, module in model.named_modules():
        if compat.calls_attention_interface(type(module)):
            yield name, module, infer_role(module)


def attention_mechanisms(model: nn.Module) -> dict[str, plugin.AttentionMechanism]:
    """The :class:`plugin.AttentionMechanism` of every attention module that holds one, by module name.

    Works for sparsified models (:func:`sparsify`) and the ``Sparse*`` classes alike; a model
    running a plain ``attn_implementation`` holds none (an empty dict).
    """
    found = {}
    for name, module in model.named_modules():
        mech = getattr(module, MECHANISM_ATTRIBUTE, None)
        if isinstance(mech, plugin.AttentionMechanism) and not isinstance(module, plugin.AttentionMechanism):
            found[name] = mech
    return found


def attention_parameter_values(model: nn.Module, step: int | None = None) -> dict[str, list[float]]:
    """The learned or scheduled parameter of every mechanism, per head, by module name.

    A learned alpha gives its ``num_heads`` values; a scheduled parameter its value once per
    head. The key is the module name for entmax's alpha and ``"<module name>.<param>"`` for
    another scheduled parameter (fusedmax's ``lam``) and for another learned per-head parameter
    (the scalable variants' ``s``, ``beta``, ``gamma``). Mechanisms with none are left out.

    ``step``: the values at that schedule step (a learned alpha takes over from a schedule at
    its end, as in the mechanism); None: at each mechanism's own step. Nothing is changed.
    """
    values: dict[str, list[float]] = {}
    for name, mech in attention_mechanisms(model).items():
        heads = mech.num_heads or 1
        learned = getattr(mech.normalizer, "learned", None)
        schedule = mech.schedule
        at = mech.schedule_step_value if step is None else step
        if schedule is not None and (learned is None or at < schedule.final_step):
            key = name if schedule.param == "alpha" else f"{name}.{schedule.param}"
            values[key] = [float(schedule.value(at))] * heads
        elif learned is not None:
            values[name] = [float(a) for a in learned().detach().float().reshape(-1).cpu()]
        # other learned per-head parameters of the normalizer (scalable variants' s, beta, gamma)
        for pname, child in mech.normalizer.named_children():
            weight = getattr(child, "weight", None)
            if pname != "learned" and isinstance(weight, nn.Parameter) and weight.dim() == 1:
                values[f"{name}.{pname}"] = [float(w) for w in weight.detach().float().cpu()]
    return values


# ----------------------------------------------------------------------------- validation


def _by_role(argument: str, value: Any, roles_present: set[str] | None,
             allow_none: bool) -> dict[str, str] | str | None:
    """Check a spec or schedule argument: None (if allowed), a string, or a dict {role: string}."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in ROLES]
        if unknown:
            raise ValueError(f"sparsify: {argument} has unknown role(s) {unknown}; valid choices: {', '.join(ROLES)}")
        if roles_present is not None:
            missing = [k for k in value if k not in roles_present]
            if missing:
                raise ValueError(
                    f"sparsify: {argument} names role(s) {missing} that the model has no attention module for; "
                    f"valid choices for this model: {', '.join(r for r in ROLES if r in roles_present)}"
                )
        bad = {k: v for k, v in value.items() if not isinstance(v, str) and not (allow_none and v is None)}
        if bad:
            raise ValueError(f"sparsify: {argument} values must be strings; got {bad!r}")
        return {k: v for k, v in value.items() if v is not None}
    kinds = "None, " if allow_none else ""
    raise ValueError(
        f"sparsify: {argument} must be {kinds}a string or a dict {{role: string}} with roles "
        f"{', '.join(ROLES)}; got {type(value).__name__}"
    )


def normalize_setting(spec: Any, schedule: Any = None, roles_present: set[str] | None = None) -> dict[str, Any]:
    """Validate and canonicalize a (spec, schedule) pair; the value of the config field :data:`SPARSIFY_FIELD`.

    ``spec`` is a spec string (every attention module) or a dict ``{role: spec}`` (roles
    ``"encoder"``, ``"decoder"``, ``"cross"``; a role left out runs softmax). ``schedule`` is None,
    a schedule string (for every role whose spec is given) or a dict ``{role: schedule}``. Raises
    ValueError naming the argument, the role and the valid choices.
    """
    specs = _by_role("spec", spec, roles_present, allow_none=False)
    schedules = _by_role("schedule", schedule, roles_present, allow_none=True)

    def canonical(text: str, where: str) -> str:
        try:
            return plugin.canonical_spec(text)
        except ValueError as err:
            raise ValueError(f"sparsify: {where}={text!r}: {err}") from None

    if isinstance(specs, str):
        specs = canonical(specs, "spec")
    else:
        assert specs is not None
        if not specs:
            raise ValueError(f"sparsify: spec is an empty dict; give a spec for at least one of {', '.join(ROLES)}")
        specs = {role: canonical(s, f"spec[{role!r}]") for role, s in specs.items()}
    if isinstance(schedules, dict):
        if isinstance(specs, dict):
            without = [r for r in schedules if r not in specs]
            if without:
                raise ValueError(f"sparsify: schedule for role(s) {without} whose spec is not given (softmax, nothing "
                                 f"to schedule); roles with a spec: {', '.join(specs)}")
        schedules = {role: _schedule(text, _spec_of(specs, role), f"schedule[{role!r}]")
                     for role, text in schedules.items()}
        schedules = schedules or None
    elif isinstance(schedules, str):
        if isinstance(specs, str):
            schedules = _schedule(schedules, specs, "schedule")
        else:  # one schedule for every role with a spec; canonical per role (its end is the role's value)
            schedules = {role: _schedule(schedules, s, f"schedule (for role {role!r})") for role, s in specs.items()}
    return {"spec": specs, "schedule": schedules}


def _schedule(text: str, spec: str, where: str) -> str:
    try:
        return str(plugin.parse_schedule(text, spec, name=f"sparsify: {where}"))
    except ValueError as err:
        raise ValueError(str(err)) from None


def _spec_of(specs: str | dict[str, str], role: str | None) -> str:
    if isinstance(specs, str):
        return specs
    if role is None:
        return _ABSENT_ROLE_SPEC
    return specs.get(role, _ABSENT_ROLE_SPEC)


def _schedule_of(schedules: str | dict[str, str] | None, specs: str | dict[str, str], role: str) -> str | None:
    if schedules is None:
        return None
    if isinstance(schedules, str):
        return schedules if isinstance(specs, str) or role in specs else None
    return schedules.get(role)


def saved_setting(config: Any) -> dict[str, Any] | None:
    """The value of ``config.sparse_attention`` (:data:`SPARSIFY_FIELD`), checked; None when absent or null."""
    value = getattr(config, SPARSIFY_FIELD, None)
    if value is None:
        return None
    if not isinstance(value, Mapping) or "spec" not in value or set(value) - {"spec", "schedule"}:
        raise ValueError(
            f"config field {SPARSIFY_FIELD!r}={value!r} is not a sparsify setting; valid: "
            f'{{"spec": <spec or {{role: spec}}>, "schedule": <schedule, {{role: schedule}} or null>}}, or null / no '
            f"field for transformers' own attention"
        )
    try:
        return normalize_setting(value["spec"], value.get("schedule"))
    except ValueError as err:
        raise ValueError(f"config field {SPARSIFY_FIELD!r}: {err}") from None


# ----------------------------------------------------------------------------- attaching


def _build(spec: str, num_heads: int | None, role: str | None, schedule: str | None) -> plugin.AttentionMechanism:
    # on the CPU with real data even inside from_pretrained's meta-device context (continuous
    # mechanisms compute tables at construction)
    with torch.device("cpu"):
        return plugin.AttentionMechanism(spec, num_heads=num_heads, role=role, schedule=schedule)


def _attach(model: nn.Module, setting: dict[str, Any]) -> int:
    """Give every attention module the mechanism of its role; keep one that already matches. Returns the count."""
    specs, schedules = setting["spec"], setting["schedule"]
    count = 0
    for _, module, role in attention_modules(model):
        spec = _spec_of(specs, role)
        schedule = _schedule_of(schedules, specs, role)
        heads = compat.attention_heads(module)
        current = getattr(module, MECHANISM_ATTRIBUTE, None)
        count += 1
        if (isinstance(current, plugin.AttentionMechanism) and current.spec == spec and current.num_heads == heads
                and (str(current.schedule) if current.schedule is not None else None) == schedule):
            continue  # a submodel's post_init already attached it
        mech = _build(spec, heads, role, schedule)
        reference = next(module.parameters(), None)
        if reference is not None:
            mech = mech.to(device=reference.device, dtype=reference.dtype)
        setattr(module, MECHANISM_ATTRIBUTE, mech)
    return count


def _select_per_module(model: nn.Module) -> None:
    configs = [getattr(model, "config", None)] + [getattr(m, "config", None) for _, m, _ in attention_modules(model)]
    seen: set[int] = set()
    for config in configs:
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            compat.set_attn_implementation(config, PER_MODULE)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"sparsify: model must be a transformers PreTrainedModel; got {type(model).__name__}")
    if not supports_attention_interface(type(model)):
        raise ValueError(
            f"sparsify: {type(model).__name__} does not route its attention through transformers' "
            f"AttentionInterface, so its attention modules would ignore the mechanisms and run softmax. Families "
            f"that do include BERT, RoBERTa, ModernBERT, BART, Marian, mBART, Pegasus, T5, GPT-2 and Llama."
        )


def sparsify(model: Any, spec: str | Mapping[str, str], *, schedule: str | Mapping[str, str] | None = None) -> Any:
    """Give every attention module of ``model`` its own mechanism, in place; returns ``model``.

    Parameters
    ----------
    model : a transformers model whose attention goes through the ``AttentionInterface`` (BERT,
        RoBERTa, ModernBERT, GPT-2, Llama, BART, T5, ...), or a ``Sparse*`` model (its
        ``set_attention_specs`` is called).
    spec : a spec string for every attention module (``"entmax:alpha=learned"``: one learned
        alpha per head and layer), or a dict ``{role: spec}`` with roles ``"encoder"``,
        ``"decoder"``, ``"cross"`` as :func:`hf_models.infer_role` gives them; a role left out
        runs softmax (exactly, on the SDPA path); a role the model does not have raises.
    schedule : None, a schedule string (``plugin.schedule``, e.g. ``"linear:start=1,steps=500"``:
        alpha from softmax to the spec's value) for every role with a spec, or a dict by role.

    The mechanisms are built on each module's device and dtype; new learned parameters start
    from the core's defaults (alpha = 1.5, or a schedule's end). The setting is recorded in
    ``config.sparse_attention`` (written by ``save_pretrained``), and ``config.attention_spec`` is
    cleared. Raises ValueError for a bad spec or schedule, a schedule that does not fit its
    spec, or a model whose attention does not go through the ``AttentionInterface``.
    """
    from .sparse import SparseAttentionModelMixin

    _check_model(model)
    roles_present = {role for _, _, role in attention_modules(model)}
    if not roles_present:
        raise ValueError(f"sparsify: found no attention module of {type(model).__name__} that calls transformers' "
                         f"AttentionInterface; nothing would run the mechanisms")
    setting = normalize_setting(spec, schedule, roles_present)
    if isinstance(model, SparseAttentionModelMixin):
        fields: dict[str, str | None] = {}
        for role in ROLES:
            fields[f"{role}_attn"] = _spec_of(setting["spec"], role)
            fields[f"{role}_attn_schedule"] = _schedule_of(setting["schedule"], setting["spec"], role)
        model.set_attention_specs(**fields)
        return model
    _attach(model, setting)
    _select_per_module(model)
    setattr(model.config, SPARSIFY_FIELD, setting)
    if getattr(model.config, CONFIG_FIELD, None) is not None:
        setattr(model.config, CONFIG_FIELD, None)
    return model


# ----------------------------------------------------------------------------- transformers hooks


def learnable_spec(name: Any) -> str | None:
    """The canonical form of ``name`` when it is a valid spec with trainable parameters, else None."""
    if not isinstance(name, str):
        return None
    try:
        canonical = plugin.canonical_spec(name)
        with torch.device("cpu"):  # may run inside from_pretrained's meta-device context
            probe = plugin.AttentionMechanism(canonical, num_heads=1)
    except (ValueError, TypeError, RuntimeError):
        return None
    return canonical if probe.learnable else None


def check_implementation(model: Any, requested: Any, is_init_check: bool) -> str | None:
    """The sparsify part of the ``attn_implementation`` check; None leaves the choice to the generic check.

    - a config carrying :data:`SPARSIFY_FIELD` (a sparsified checkpoint): :data:`PER_MODULE`, its
      mechanisms are attached by :func:`after_post_init`; another requested implementation raises
      (it would bypass the mechanisms and their learned parameters);
    - a requested spec with trainable parameters (``"entmax:alpha=learned"``): the model is
      sparsified with it (at construction: the field is set and :func:`after_post_init`
      attaches; on a built model: :func:`sparsify`).
    """
    setting = saved_setting(getattr(model, "config", None))
    learned = learnable_spec(requested)
    if setting is not None:
        if requested in (None, PER_MODULE) or (learned is not None and learned == setting["spec"]):
            _check_model(model)
            return PER_MODULE
        raise ValueError(
            f"{type(model).__name__} was sparsified (config field {SPARSIFY_FIELD!r}={setting!r}): its attention "
            f"modules run their own mechanisms, and attn_implementation={requested!r} would bypass them and their "
            f"parameters. Change them with hf_models.sparsify(model, spec); to load transformers' own attention, set "
            f"config.{SPARSIFY_FIELD} = None and pass that config to from_pretrained"
        )
    if learned is None:
        return None
    _check_model(model)
    if is_init_check:
        setattr(model.config, SPARSIFY_FIELD, normalize_setting(learned))
        if getattr(model.config, CONFIG_FIELD, None) is not None:
            setattr(model.config, CONFIG_FIELD, None)
    else:
        sparsify(model, learned)
    return PER_MODULE



def _is_sparse_class(model: Any) -> bool:
    from .sparse import SparseAttentionModelMixin

    return isinstance(model, SparseAttentionModelMixin)


def after_post_init(model: Any) -> None:
    """End of ``post_init``: a model whose config carries :data:`SPARSIFY_FIELD` gets its mechanisms."""
    if _is_sparse_class(model):
        return
    setting = saved_setting(getattr(model, "config", None))
    if setting is not None and compat.attn_implementation(model.config) == PER_MODULE:
        _attach(model, setting)


@torch.no_grad()
def after_initialize_weights(model: Any) -> None:
    """End of ``initialize_weights``: fill the mechanisms' tensors a checkpoint lacked, then sync the schedules.

    ``from_pretrained`` builds the model on the meta device, loads the checkpoint, and leaves
    every tensor it lacked (a learned alpha converted from a stock checkpoint, non-persistent
    buffers) for ``initialize_weights``; transformers' ``_init_weights`` does not know the
    mechanisms, so these tensors are copied from a freshly built mechanism of the same spec
    (loaded ones are left alone). Each schedule then reads its step from its (loaded) buffer.
    """
    fresh: dict[tuple[str, int | None, str | None, str | None], dict[str, torch.Tensor]] = {}
    for module in model.modules():
        if not isinstance(module, plugin.AttentionMechanism):
            continue
        schedule = str(module.schedule) if module.schedule is not None else None
        key = (module.spec, module.num_heads, module.role, schedule)
        if key not in fresh:
            built = _build(module.spec, module.num_heads, module.role, schedule)
            fresh[key] = dict(built.named_parameters()) | dict(built.named_buffers())
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.device.type != "meta" and name in fresh[key]:
                compat.copy_unless_loaded(tensor, fresh[key][name].to(tensor.dtype))
        if module.schedule is not None and module.schedule_step.device.type != "meta":
            module.set_schedule_step(int(module.schedule_step))


def install_hooks() -> None:
    """Install :func:`after_post_init` and :func:`after_initialize_weights` (idempotent; done on import)."""
    compat.install_model_hooks(after_post_init, after_initialize_weights)
