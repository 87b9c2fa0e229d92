"""The command-line flags that choose the attention of each role, and its schedule."""

from __future__ import annotations

import argparse

import plugin

#: flag name -> (argparse dest, the attention it sets)
ATTENTION_FLAGS = {
    "--encoder-attn": ("encoder_attn", "encoder self-attention"),
    "--decoder-attn": ("decoder_attn", "decoder self-attention"),
    "--cross-attn": ("cross_attn", "encoder-decoder (cross) attention"),
}
DEFAULT_SPEC = "softmax"
#: schedule flag -> (argparse dest, the spec flag whose parameter it moves)
SCHEDULE_FLAGS = {f"{flag}-schedule": (f"{dest}_schedule", flag) for flag, (dest, _) in ATTENTION_FLAGS.items()}


def attention_spec(text: str) -> str:
    """argparse ``type=``: validate a spec string and return its canonical form.

    An unknown variant or a bad parameter value fails at argument parsing with the core's
    message, which lists the valid variants (or the parameter's valid range).
    """
    try:
        return plugin.canonical_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _schedule_type(flag: str):
    def schedule_syntax(text: str) -> str:
        """argparse ``type=``: the checks that need no spec (strategy, keys, step counts)."""
        try:
            plugin.schedule.check_schedule_syntax(text, name=flag)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text.strip()

    return schedule_syntax


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--encoder-attn``, ``--decoder-attn`` and ``--cross-attn`` to ``parser``.

    No argparse default is set, so architecture functions can give their own (fairseq's
    convention); the ``sparse_transformer`` architectures default every role to softmax.
    """
    names = ", ".join(sorted(plugin.variants()))
    for flag, (dest, what) in ATTENTION_FLAGS.items():
        parser.add_argument(
            flag,
            dest=dest,
            type=attention_spec,
            metavar="SPEC",
            help=(
                f"attention of the {what}: a spec string such as 'sparsemax', 'entmax:alpha=1.3', "
                f"'entmax:alpha=learned', 'fusedmax:lam=0.5' or 'sparsemax+continuous_softmax' "
                f"(default: {DEFAULT_SPEC}); variants: {names}"
            ),
        )
    strategies = ", ".join(plugin.STRATEGIES)
    for flag, (dest, spec_flag) in SCHEDULE_FLAGS.items():
        parser.add_argument(
            flag,
            dest=dest,
            type=_schedule_type(flag),
            metavar="SCHEDULE",
            help=(
                f"move a parameter of {spec_flag}'s spec with the update count, e.g. 'cosine:start=1,steps=2000' "
                f"(alpha from softmax to the spec's value), keys param, start, end, steps, warmup, hold; "
                f"strategies: {strategies}; inference uses the end value"
            ),
        )


def fill_attention_defaults(args) -> None:
    """Set every role that ``args`` leaves unset to :data:`DEFAULT_SPEC`, and check the schedules.

    fairseq calls the architecture function (which calls this) inside ``parse_args_and_arch``,
    so a schedule that does not fit its spec (a parameter the spec lacks, a value out of the
    parameter's range) fails there, before anything is built, with a ValueError that names the
    flag and the valid choices.
    """
    for dest, _ in ATTENTION_FLAGS.values():
        if getattr(args, dest, None) is None:
            setattr(args, dest, DEFAULT_SPEC)
    for flag, (dest, spec_flag) in SCHEDULE_FLAGS.items():
        text = getattr(args, dest, None)
        if text:
            plugin.parse_schedule(text, getattr(args, ATTENTION_FLAGS[spec_flag][0]), name=flag)
        else:
            setattr(args, dest, None)
