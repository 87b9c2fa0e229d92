"""Every private or version-fragile part of transformers that ``hf_models`` relies on, in one place.

The adapter depends on transformers 5 internals in a handful of places: the attention and mask
registries, the private ``config._attn_implementation`` attribute, the model-class check that
``attn_implementation`` is honoured, the output collector, the initialization helper that
skips loaded tensors, the attention-module classes of the families and the attributes they
carry. Each lives here behind a small function whose docstring names what it relies on; the
other modules of the package import them from here. ``tests/hf_models/test_compat.py`` checks
each of them against the installed transformers, so an upgrade that moves one fails there,
with a message naming it, and not deep inside a forward pass.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers import initialization as hf_init
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bart.modeling_bart import BartAttention
from transformers.models.marian.modeling_marian import MarianAttention
from transformers.models.mbart.modeling_mbart import MBartAttention
from transformers.models.pegasus.modeling_pegasus import PegasusAttention
from transformers.models.t5.modeling_t5 import T5Attention

RESERVED_SUBSTRINGS = ("flash", "sdpa", "flex_attention", "/", "|")
"""Substrings that give an ``attn_implementation`` name transformers' own dispatch.

Relies on ``PreTrainedModel._check_and_adjust_attn_implementation`` and
``transformers.integrations.hub_kernels.is_kernel``: "flash" anywhere -> flash-attention paths,
"sdpa" / "flex_attention" -> their own checks, "org/name" -> a kernel downloaded from the Hub,
"paged|" -> paged attention.
"""

TRANSFORMERS_NAMES = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "paged|eager")
"""``attn_implementation`` names of transformers itself."""

ATTENTION_MODULE_CLASSES: dict[str, type[nn.Module]] = {
    "bart": BartAttention,
    "marian": MarianAttention,
    "mbart": MBartAttention,
    "pegasus": PegasusAttention,
    "t5": T5Attention,
}
"""The attention module class of each stock family (``transformers.models.<family>.modeling_<family>``)."""

# ----------------------------------------------------------------------------- registries


def register_attention(name: str, attention: Callable[..., Any], mask: Callable[..., Any]) -> None:
    """Register ``attention`` in ``AttentionInterface`` and ``mask`` in ``AttentionMaskInterface`` as ``name``.

    Relies on both registries being global and keyed by ``config._attn_implementation``.
    Without the mask registration transformers passes ``attention_mask=None`` (padding silently
    attended), so the two always go together.
    """
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def boolean_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """transformers' ``masking_utils.sdpa_mask``: a bool (B, 1, Lq, Lk) mask (True = attend) or None.

    None means no mask is needed: bidirectional without padding, or purely causal (the attention
    function then applies causality from ``module.is_causal``).
    """
    return sdpa_mask(*args, **kwargs)


def is_registered_attention_name(name: str) -> bool:
    """Whether transformers already accepts ``name`` as ``attn_implementation`` (``"eager"`` or any registered name).

    Relies on ``transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS`` supporting ``in``.
    """
    return name == "eager" or name in ALL_ATTENTION_FUNCTIONS


def attention_names() -> list[str]:
    """Every ``attn_implementation`` name transformers accepts now: ``"eager"`` and the registered ones.

    Relies on ``ALL_ATTENTION_FUNCTIONS.valid_keys()``.
    """
    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


# ----------------------------------------------------------------------------- configs and models

_ACTIVE_COLLECTOR: Any
try:
    from transformers.utils.output_capturing import _active_collector as _ACTIVE_COLLECTOR
except ImportError:  # a transformers without the output collector
    _ACTIVE_COLLECTOR = None


def attn_implementation(config: Any) -> Any:
    """The private ``config._attn_implementation`` (None when the object has no such attribute)."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config: Any, name: str | None) -> None:
    """Set the private ``config._attn_implementation``, which every attention module reads per call."""
    config._attn_implementation = name


def routes_attention_through_interface(model_class: type) -> bool:
    """Whether ``model_class`` honours ``attn_implementation`` (transformers' own test).

    Relies on the private classmethod ``PreTrainedModel._can_set_attn_implementation``, which
    reads the modeling source: attention modules that never call
    ``ALL_ATTENTION_FUNCTIONS.get_interface`` ignore ``attn_implementation``.
    """
    check = getattr(model_class, "_can_set_attn_implementation", None)
    return bool(check()) if check is not None else False


ImplementationCheck = Callable[[PreTrainedModel, str | None, bool], str]

_STOCK_IMPLEMENTATION_CHECK: ImplementationCheck = PreTrainedModel.get_correct_attn_implementation


def stock_implementation_check(model: PreTrainedModel, requested: str | None, is_init_check: bool = False) -> str:
    """transformers' own ``PreTrainedModel.get_correct_attn_implementation`` (as it was before any wrapping)."""
    return _STOCK_IMPLEMENTATION_CHECK(model, requested, is_init_check)


def install_implementation_check(check: ImplementationCheck) -> None:
    """Put ``check`` in place of ``PreTrainedModel.get_correct_attn_implementation`` (idempotent).

    Relies on transformers validating ``attn_implementation`` in that method, with the
    signature ``(self, requested_attention, is_init_check=False) -> str``, at model
    construction and in ``set_attn_implementation``.
    """
    if PreTrainedModel.get_correct_attn_implementation is not check:
        setattr(PreTrainedModel, "get_correct_attn_implementation", check)  # noqa: B010 (a method replaced on purpose)


def install_model_hooks(after_post_init: Callable[[PreTrainedModel], None],
                        after_initialize_weights: Callable[[PreTrainedModel], None]) -> None:
    """Run ``after_post_init(model)`` at the end of ``PreTrainedModel.post_init`` and
    ``after_initialize_weights(model)`` at the end of ``PreTrainedModel.initialize_weights`` (idempotent).

    Relies on transformers calling ``post_init()`` at the end of every model's ``__init__`` (the
    modules exist; ``from_pretrained`` builds them on the meta device), and
    ``initialize_weights()`` in ``from_pretrained`` after the checkpoint's tensors are loaded, to
    fill the ones it lacked (tensors loaded are marked ``_is_hf_initialized``).
    """
    for method, hook in (("post_init", after_post_init), ("initialize_weights", after_initialize_weights)):
        current = getattr(PreTrainedModel, method)
        if getattr(current, "_hf_models_hook", None) is hook:
            continue
        stock = getattr(current, "_hf_models_stock", current)

        def wrapped(self: PreTrainedModel, *args: Any, _stock: Any = stock, _hook: Any = hook, **kwargs: Any) -> Any:
            result = _stock(self, *args, **kwargs)
            _hook(self)
            return result

        functools.update_wrapper(wrapped, stock)
        wrapped._hf_models_hook = hook  # type: ignore[attr-defined]
        wrapped._hf_models_stock = stock  # type: ignore[attr-defined]
        setattr(PreTrainedModel, method, wrapped)


def copy_unless_loaded(tensor: Tensor, value: Tensor) -> None:
    """Copy ``value`` into ``tensor`` unless ``from_pretrained`` loaded it from the checkpoint.

    Relies on ``transformers.initialization.copy_``, which skips tensors marked
    ``_is_hf_initialized``.
    """
    hf_init.copy_(tensor, value)


def collecting_attentions() -> bool:
    """Whether transformers' output collector is recording attention weights right now.

    Some modules consume ``output_attentions`` themselves (GPT-2), so the attention function
    also reads the private ``transformers.utils.output_capturing._active_collector`` (a context
    variable holding the names being collected). A transformers without it: False.
    """
    if _ACTIVE_COLLECTOR is None:
        return False
    collected = _ACTIVE_COLLECTOR.get()
    return bool(collected) and any("attentions" in key for key in collected)


# ----------------------------------------------------------------------------- attention modules


def attention_role(module: nn.Module) -> str:
    """The role of a transformers attention module: ``"encoder"``, ``"decoder"`` or ``"cross"``.

    Relies on the attributes transformers' attention modules carry: ``is_cross_attention``
    (GPT-2, BERT's wrapper) or a ``CrossAttention`` class name (BERT), ``is_causal`` (decoder
    self-attention), ``is_decoder`` without ``is_causal`` (the encoder-decoder attention of
    BART, Marian, mBART, Pegasus and T5).
    """
    if getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__:
        return "cross"
    if getattr(module, "is_causal", False):
        return "decoder"
    if getattr(module, "is_decoder", False):
        return "cross"
    return "encoder"


def attention_heads(module: nn.Module) -> int:
    """The number of query heads of a transformers attention module.

    Read from the module (``num_heads``, T5's ``n_heads``, BERT's ``num_attention_heads``), else
    from its config's ``num_attention_heads`` (Llama, ModernBERT and most recent families keep only
    ``head_dim`` on the module).
    """
    for attr in ("num_heads", "n_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    config = getattr(module, "config", None)
    for attr in ("num_attention_heads", "num_heads", "n_head"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"cannot find the number of heads of {type(module).__name__} (num_heads / n_heads, "
                     f"or num_attention_heads in its config)")


INTERFACE_CALL = "ALL_ATTENTION_FUNCTIONS.get_interface("
"""The call by which a transformers attention module picks its attention function by name."""


_INTERFACE_CALLERS: dict[type, bool] = {}


def calls_attention_interface(module_class: type) -> bool:
    """Whether instances of ``module_class`` call transformers' ``AttentionInterface`` themselves.

    Relies on the convention of transformers' modeling files (the one
    ``PreTrainedModel._can_set_attn_implementation`` reads): the attention module whose
    ``forward`` computes attention calls ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` and passes
    itself as the first argument. The source of the class and of its bases up to ``nn.Module`` is
    read (a wrapper such as ``BertAttention``, which calls ``BertSelfAttention``, does not match;
    nor do model classes).
    """
    known = _INTERFACE_CALLERS.get(module_class)
    if known is None:
        known = _INTERFACE_CALLERS[module_class] = _reads_interface_call(module_class)
    return known


def _reads_interface_call(module_class: type) -> bool:
    if not issubclass(module_class, nn.Module) or issubclass(module_class, PreTrainedModel):
        return False  # models themselves (PreTrainedModel's own source names the call)
    for cls in module_class.__mro__:
        if cls is nn.Module or cls is object:
            break
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if INTERFACE_CALL in source:
            return True
    return False


def is_fixed_position_table(module: nn.Module) -> bool:
    """Whether ``module`` is a sinusoidal position table (Marian's and Pegasus' ``*SinusoidalPositionalEmbedding``).

    Relies on the class name; these tables are left out of ``save_pretrained``
    (``_keys_to_ignore_on_save``) and recomputed at load, so they must not train.
    """
    return "SinusoidalPositionalEmbedding" in type(module).__name__

