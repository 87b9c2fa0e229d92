"""A compiled fairseq model: the forward pass equals eager, and graph breaks come only from fairseq."""

from __future__ import annotations

from pathlib import Path

import torch

from .helpers import NO_DROPOUT, PAIRS, TINY_DIMS, build_model, make_batch, sharpen

ROLES = ["--encoder-attn", "sparsemax", "--decoder-attn", "entmax:alpha=learned", "--cross-attn", "fusedmax:lam=0.5"]


def test_compiled_forward_equals_eager_and_breaks_only_in_fairseq(data_bin, fresh_dynamo):
    import fairseq

    model, task = build_model(data_bin, "sparse_transformer", *TINY_DIMS, *NO_DROPOUT, *ROLES)
    sharpen(model)
    model.eval()
    batch = make_batch(task, PAIRS)
    args = (batch.src_tokens, batch.src_lengths, batch.prev_output_tokens)
    with torch.no_grad():
        eager_logits, eager_extra = model(*args)
        logits, extra = torch.compile(model, backend="aot_eager")(*args)
        explained = torch._dynamo.explain(model)(*args)
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(extra["attn"][0], eager_extra["attn"][0], atol=1e-6, rtol=1e-5)
    # fairseq's own encoder and decoder branch on tensor values (`if has_pads`, ...); nothing in
    # the user dir or the core does
    fairseq_root = Path(fairseq.__file__).resolve().parent
    places = {(Path(r.user_stack[-1].filename).resolve(), r.user_stack[-1].lineno) for r in explained.break_reasons}
    assert places and all(fairseq_root in path.parents for path, _ in places), places
