"""The ``translation_optimal_stop`` task: fairseq's translation task whose beam search stops optimally.

    fairseq-generate data-bin --user-dir user_dir --task translation_optimal_stop \\
        --path checkpoints/checkpoint_best.pt --beam 5

Data, dictionaries, models, training and scoring are those of ``--task translation`` (a
checkpoint trained with either task works with both); only the generator differs: beam search
with :class:`user_dir.beam_search.OptimalStopBeamSearch`, which stops a sentence only when no
active hypothesis can still beat the best finished one, instead of fairseq's
``SequenceGenerator``, which stops once ``beam`` hypotheses have ended. fairseq-generate,
fairseq-interactive and validation BLEU during training (``--eval-bleu``) all build their
generator through the task, so all three use it.

The generation options this search does not implement (sampling, diverse beams, constraints,
prefixes (``--prefix-size``), alignments, a language model, unknown-word and temperature settings, n-gram
blocking, ``--match-source-len``) raise ``ValueError`` naming the option, not a silent fallback
to fairseq's search. ``--score-reference`` scores the references (no search) as in ``translation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..beam_search import OptimalStopBeamSearch

TASK_NAME = "translation_optimal_stop"

#: generation option (config attribute) -> (its command-line flag, the value that means "off")
UNSUPPORTED_OPTIONS: dict[str, tuple[str, Any]] = {
    "sampling": ("--sampling", False),
    "diverse_beam_groups": ("--diverse-beam-groups", -1),
    "diversity_rate": ("--diversity-rate", -1),
    "match_source_len": ("--match-source-len", False),
    "constraints": ("--constraints", None),
    "prefix_allowed_tokens_fn": ("prefix_allowed_tokens_fn", None),
    "print_alignment": ("--print-alignment", None),
    "unkpen": ("--unkpen", 0),
    "temperature": ("--temperature", 1.0),
    "no_repeat_ngram_size": ("--no-repeat-ngram-size", 0),
    "prefix_size": ("--prefix-size", 0),
}


@dataclass
class TranslationOptimalStopConfig(TranslationConfig):
    """The options of ``--task translation`` (this task adds none: the search is its difference)."""


@register_task(TASK_NAME, dataclass=TranslationOptimalStopConfig)
class TranslationOptimalStopTask(TranslationTask):
    """``translation`` with :class:`~user_dir.beam_search.OptimalStopBeamSearch` as its generator."""

    def build_generator(
        self,
        models: Any,
        args: Any,
        seq_gen_cls: Any = None,
        extra_gen_cls_kwargs: dict[str, Any] | None = None,
        prefix_allowed_tokens_fn: Any = None,
    ) -> Any:
        if getattr(args, "score_reference", False):
            return super().build_generator(models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn)
        if seq_gen_cls is not None:
            raise ValueError(
                f"--task {TASK_NAME} builds its own generator; seq_gen_cls={seq_gen_cls!r} is not supported "
                "(use --task translation for fairseq's SequenceGenerator)"
            )
        chosen = {"prefix_allowed_tokens_fn": prefix_allowed_tokens_fn}
        for option, (flag, off) in UNSUPPORTED_OPTIONS.items():
            value = chosen.get(option) or getattr(args, option, off)
            if value is not None and value != off and not (option == "print_alignment" and value is False):
                raise ValueError(
                    f"{flag}={value!r} is not supported by --task {TASK_NAME} (its beam search takes --beam, "
                    "--max-len-a, --max-len-b, --min-len, --lenpen, --unnormalized and --nbest); use --task "
                    f"translation for fairseq's search with {flag}"
                )
        extra = dict(extra_gen_cls_kwargs or {})
        if extra.get("lm_model") is not None:
            raise ValueError(
                f"--lm-path is not supported by --task {TASK_NAME}; "
                "use --task translation for fusion with a language model"
            )
        unknown = sorted(set(extra) - {"lm_model", "lm_weight"})
        if unknown:
            raise ValueError(f"extra_gen_cls_kwargs {unknown} are not supported by --task {TASK_NAME}")
        return OptimalStopBeamSearch(
            self.target_dictionary,
            beam_size=getattr(args, "beam", 5),
            max_len_a=getattr(args, "max_len_a", 0),
            max_len_b=getattr(args, "max_len_b", 200),
            min_len=getattr(args, "min_len", 1),
            normalize_scores=not getattr(args, "unnormalized", False),
            len_penalty=getattr(args, "lenpen", 1),
        )
