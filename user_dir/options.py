"""The command-line flags that choose the attention of each role."""

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


def attention_spec(text: str) -> str:
    """argparse ``type=``: validate a spec string and return its canonical form.

    An unknown variant or a bad parameter value fails at argument parsing with the core's
    message, which lists the valid variants (or the parameter's valid range).
    """
    try:
        return plugin.canonical_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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


def fill_attention_defaults(args) -> None:
    """Set every role that ``args`` leaves unset to :data:`DEFAULT_SPEC`."""
    for dest, _ in ATTENTION_FLAGS.values():
        if getattr(args, dest, None) is None:
            setattr(args, dest, DEFAULT_SPEC)
