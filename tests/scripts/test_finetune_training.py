"""scripts/finetune.py's training pieces: a model built from a config hears its source, batches of similar
length under a token budget, label smoothing, the learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


@pytest.fixture(scope="module")
def tokenizer(finetune):
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    return finetune.build_tokenizer(texts, "seq2seq", "word", 64)


def _args(finetune, *extra: str):
    return finetune.parse_args(["--task", "seq2seq", "--train-file", "t.jsonl", "--valid-file", "v.jsonl",
                                "--output-dir", "out", "--from-config", *extra])


@pytest.mark.parametrize("arch", ["marian", "bart"])
def test_a_model_built_from_a_config_hears_its_source_from_the_first_step(finetune, tokenizer, arch):
    """Weights drawn with std d**-0.5 (embeddings scaled by sqrt(d) then have unit size, as in fairseq): the
    decoder's output depends on the source from the start. With transformers' std 0.02 (made for wide
    pretrained models), a 2-layer d=64 model's cross-attention path is ~20x weaker (value and output
    projections both small) and the decoder learns the target language alone, never the source."""
    d = 64

    def source_effect(*extra: str) -> tuple[float, float]:
        args = _args(finetune, "--arch", arch, "--d-model", str(d), "--heads", "4", "--ffn-dim", "128",
                     "--dropout", "0", *extra)
        torch.manual_seed(0)
        model = finetune.build_model(args, tokenizer, None).eval()
        assert model.config.scale_embedding  # embedded tokens at unit scale, like the positions
        gen = torch.Generator().manual_seed(1)
        a, b = (torch.randint(4, len(tokenizer), (4, 9), generator=gen) for _ in range(2))
        dec = torch.randint(4, len(tokenizer), (4, 6), generator=gen)
        with torch.no_grad():
            la = model(input_ids=a, decoder_input_ids=dec).logits
            lb = model(input_ids=b, decoder_input_ids=dec).logits
        # how much the decoder's output moves when the source changes, relative to its size
        return model.get_input_embeddings().weight[1:].std().item(), float((la - lb).norm() / la.norm())

    std, effect = source_effect()
    assert std == pytest.approx(d ** -0.5, rel=0.1)
    assert effect > 0.1, effect
    std, weak = source_effect("--init-std", "0.02")  # transformers' own default, kept as an option
    assert std == pytest.approx(0.02, rel=0.1)
    assert weak < effect / 20, (weak, effect)


def test_length_batches_cover_every_example_once_within_the_token_budget(finetune):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (500,), generator=gen).tolist()
    sampler = finetune.LengthBatchSampler(lengths, max_tokens=200, batch_size=16, seed=3)
    first, second = list(sampler), list(sampler)
    for batches in (first, second):
        assert sorted(i for b in batches for i in b) == list(range(500))
        assert all(len(b) <= 16 and len(b) * max(lengths[i] for i in b) <= 200 for b in batches)
        assert len(batches) == len(sampler)
    assert first != second  # a new order every pass
    # padded tokens: far fewer than in random batches of the same sizes
    padded = sum(len(b) * max(lengths[i] for i in b) for b in first)
    assert padded < 1.15 * sum(lengths)
    again = finetune.LengthBatchSampler(lengths, max_tokens=200, batch_size=16, seed=3)
    assert list(again) == first  # every process of a data-parallel run draws the same batches
    with pytest.raises(ValueError, match="max_tokens"):
        finetune.LengthBatchSampler([5, 300], max_tokens=200)


def test_label_smoothing_is_the_smoothed_cross_entropy_of_the_unmasked_positions(finetune):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[1, 3:] = -100
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)

    class Out:
        loss = plain

    Out.logits = logits
    assert finetune.training_loss(Out, labels, 0.0) is plain
    smoothed = finetune.training_loss(Out, labels, 0.1)
    keep = labels.reshape(-1) != -100
    logp = logits.reshape(-1, 7)[keep].log_softmax(-1)
    by_hand = -(0.9 * logp.gather(1, labels.reshape(-1)[keep, None])[:, 0] + 0.1 * logp.mean(-1)).mean()
    assert smoothed.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize(("extra", "words"), [
    (["--lr-scheduler", "inverse_sqrt"], "--warmup-steps"),
    (["--label-smoothing", "1.0"], "--label-smoothing"),
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--lr-scheduler", "cosine"], "invalid choice"),
    (["--init-std", "0"], "--init-std"),
])
def test_bad_training_flags_are_refused_by_name(finetune, extra, words, capsys):
    with pytest.raises(SystemExit):
        _args(finetune, "--arch", "marian", *extra)
    assert words in capsys.readouterr().err


def test_init_std_is_refused_where_it_does_nothing(finetune, capsys):
    with pytest.raises(SystemExit):
        _args(finetune, "--arch", "t5", "--init-std", "0.05")
    assert "--init-std" in capsys.readouterr().err


@pytest.mark.parametrize("processes", [1, 2])
def test_the_schedules_after_the_warm_up(finetune, processes):
    def rates(name: str) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = finetune.learning_rate_schedule(opt, name, 100, 1000, processes)
        out = []
        for _ in range(401):
            out.append(opt.param_groups[0]["lr"])
            for _ in range(processes):  # accelerate steps it once per process
                opt.step()
                sched.step()
        return out

    inv, lin, const = rates("inverse_sqrt"), rates("linear"), rates("constant")
    assert inv[50] == pytest.approx(0.5) and inv[100] == pytest.approx(1.0)
    assert inv[400] == pytest.approx((100 / 400) ** 0.5)  # fairseq's inverse_sqrt
    assert lin[400] == pytest.approx(600 / 900) and const[400] == 1.0 and const[50] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup"):
        finetune.learning_rate_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                        "inverse_sqrt", 0, 10)
