"""Compiled transformers models: a tiny BERT by attn_implementation and a Sparse* BART train step,
traced whole (fullgraph=True) and equal to eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import hf_models
import plugin

from .tiny import config_kwargs, model_inputs, stock_model

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("spec", ["sparsemax", "entmax:alpha=1.3"])
def test_compiled_bert_classifier_equals_eager(spec):
    model = stock_model("bert", attn_implementation=spec)
    batch = model_inputs("bert")  # padded: the mask reaches the mechanism
    with torch.no_grad(), plugin.record_calls() as calls:
        eager = model(**batch).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**batch).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    assert {c.path for c in calls} == {"cpu_chunked"}
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_sparse_bart_train_step_equals_eager():
    classes = hf_models.SPARSE_FAMILIES["bart"]
    specs = {"encoder_attn": "sparsemax", "decoder_attn": "entmax:alpha=learned", "cross_attn": "fusedmax:lam=0.5"}
    batch = model_inputs("bart")
    labels = batch["decoder_input_ids"].masked_fill(batch["decoder_attention_mask"] == 0, -100)
    results = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        model = classes["seq2seq"](classes["config"](**config_kwargs("bart"), **specs)).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_it else model
        loss = run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        results.append((loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_e, grads_e, params_e), (loss_c, grads_c, params_c) = results
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    assert grads_c.keys() == grads_e.keys() and any("learned" in n for n in grads_c)  # the alphas train too
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(params_c[name], params_e[name], atol=1e-5, rtol=1e-4, msg=name)
    assert counters["stats"]["unique_graphs"] == 1
