"""Sparse, structured and continuous attention for HuggingFace transformers.

Importing this package

* registers every variant of the core registry (``plugin.variants()``) as an
  ``attn_implementation`` name, in transformers' ``AttentionInterface`` and
  ``AttentionMaskInterface``, so that any model family that routes attention through the
  interface (BERT, RoBERTa, BART, Marian, mBART, Pegasus, T5, GPT-2, Llama, ...) runs it::

      import hf_models
      model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="sparsemax")
      model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="entmax:alpha=1.3")

  (parameterized specs are registered on demand, or with :func:`register_spec`);
* makes :func:`sparsify` available: any such model gets one mechanism per attention module,
  in place, with learned parameters and schedules that save and load with it::

      model = hf_models.sparsify(AutoModel.from_pretrained(path), "entmax:alpha=learned")
      model = AutoModel.from_pretrained(path, attn_implementation="entmax:alpha=learned")  # the same

* registers the ``Sparse*`` config and model classes (per-role mechanisms, learned parameters)
  with ``AutoConfig``, ``AutoModel``, ``AutoModelForSeq2SeqLM`` and
  ``AutoModelForSequenceClassification``::

      model = SparseBartForConditionalGeneration.from_pretrained(
          stock_bart_dir, encoder_attn="entmax:alpha=learned", cross_attn="sparsemax")

See ``docs/huggingface.md``.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from .attention import (
    MECHANISM_ATTRIBUTE,
    PER_MODULE,
    ROLES,
    infer_role,
    install_implementation_check,
    is_sparse_implementation,
    register_spec,
    register_variants,
    registered_names,
    resolve_implementation,
    sparse_attention_forward,
    sparse_attention_mask,
    supports_attention_interface,
)
from .bart import (
    SparseBartConfig,
    SparseBartForConditionalGeneration,
    SparseBartForSequenceClassification,
    SparseBartModel,
)
from .marian import SparseMarianConfig, SparseMarianModel, SparseMarianMTModel
from .mbart import (
    SparseMBartConfig,
    SparseMBartForConditionalGeneration,
    SparseMBartForSequenceClassification,
    SparseMBartModel,
)
from .pegasus import (
    SparsePegasusConfig,
    SparsePegasusForConditionalGeneration,
    SparsePegasusModel,
)
from .per_module import (
    SPARSIFY_FIELD,
    attention_mechanisms,
    attention_modules,
    attention_parameter_values,
    install_hooks,
    sparsify,
)
from .schedule import AttentionScheduleCallback, finish_schedules, schedule_state, set_schedule_step
from .sparse import SCHEDULE_FIELDS, SPEC_FIELDS, SparseAttentionConfigMixin, SparseAttentionModelMixin
from .t5 import (
    SparseT5Config,
    SparseT5EncoderModel,
    SparseT5ForConditionalGeneration,
    SparseT5ForSequenceClassification,
    SparseT5Model,
)

SPARSE_FAMILIES: dict[str, dict[str, Any]] = {
    "bart": {
        "config": SparseBartConfig,
        "base": SparseBartModel,
        "seq2seq": SparseBartForConditionalGeneration,
        "classification": SparseBartForSequenceClassification,
    },
    "mbart": {
        "config": SparseMBartConfig,
        "base": SparseMBartModel,
        "seq2seq": SparseMBartForConditionalGeneration,
        "classification": SparseMBartForSequenceClassification,
    },
    "marian": {"config": SparseMarianConfig, "base": SparseMarianModel, "seq2seq": SparseMarianMTModel},
    "pegasus": {
        "config": SparsePegasusConfig,
        "base": SparsePegasusModel,
        "seq2seq": SparsePegasusForConditionalGeneration,
    },
    "t5": {
        "config": SparseT5Config,
        "base": SparseT5Model,
        "seq2seq": SparseT5ForConditionalGeneration,
        "classification": SparseT5ForSequenceClassification,
    },
}
"""The ``Sparse*`` classes of each stock family (keyed by the stock ``model_type``) and task."""

_AUTO_CLASSES = {
    "base": AutoModel,
    "seq2seq": AutoModelForSeq2SeqLM,
    "classification": AutoModelForSequenceClassification,
}


def sparse_model_class(model_type: str, task: str = "seq2seq") -> type:
    """The ``Sparse*`` model class for a stock or sparse ``model_type`` and a task.

    Parameters
    ----------
    model_type : ``config.model_type`` of a stock model (``"bart"``, ``"marian"``, ``"mbart"``,
        ``"pegasus"``, ``"t5"``) or of a sparse one (``"sparse_bart"``, ...).
    task : ``"seq2seq"``, ``"base"`` or ``"classification"``.
    """
    family = model_type.removeprefix("sparse_")
    if family not in SPARSE_FAMILIES:
        raise ValueError(
            f"no per-role sparse classes for model_type {model_type!r}; valid choices: {', '.join(SPARSE_FAMILIES)} "
            f"(other families: use attn_implementation=<spec>)"
        )
    classes = SPARSE_FAMILIES[family]
    if task not in classes or task == "config":
        valid = [t for t in classes if t != "config"]
        raise ValueError(f"task {task!r} has no sparse class for {family!r}; valid choices: {', '.join(valid)}")
    return classes[task]


def _register_auto_classes() -> None:
    for classes in SPARSE_FAMILIES.values():
        config = classes["config"]
        AutoConfig.register(config.model_type, config, exist_ok=True)
        for task, auto in _AUTO_CLASSES.items():
            if task in classes:
                auto.register(config, classes[task], exist_ok=True)


from .llama import SparseLlamaConfig, SparseLlamaForCausalLM  # noqa: E402  (registers sparse_llama)

register_variants()
install_implementation_check()
install_hooks()
_register_auto_classes()

__all__ = [
    "AttentionScheduleCallback",
    "MECHANISM_ATTRIBUTE",
    "PER_MODULE",
    "ROLES",
    "SCHEDULE_FIELDS",
    "SPARSIFY_FIELD",
    "SPARSE_FAMILIES",
    "SPEC_FIELDS",
    "SparseAttentionConfigMixin",
    "SparseAttentionModelMixin",
    "SparseBartConfig",
    "SparseBartForConditionalGeneration",
    "SparseBartForSequenceClassification",
    "SparseBartModel",
    "SparseLlamaConfig",
    "SparseLlamaForCausalLM",
    "SparseMBartConfig",
    "SparseMBartForConditionalGeneration",
    "SparseMBartForSequenceClassification",
    "SparseMBartModel",
    "SparseMarianConfig",
    "SparseMarianMTModel",
    "SparseMarianModel",
    "SparsePegasusConfig",
    "SparsePegasusForConditionalGeneration",
    "SparsePegasusModel",
    "SparseT5Config",
    "SparseT5EncoderModel",
    "SparseT5ForConditionalGeneration",
    "SparseT5ForSequenceClassification",
    "SparseT5Model",
    "attention_mechanisms",
    "attention_modules",
    "attention_parameter_values",
    "finish_schedules",
    "infer_role",
    "is_sparse_implementation",
    "register_spec",
    "register_variants",
    "registered_names",
    "resolve_implementation",
    "schedule_state",
    "set_schedule_step",
    "sparse_attention_forward",
    "sparse_attention_mask",
    "sparse_model_class",
    "sparsify",
    "supports_attention_interface",
]
