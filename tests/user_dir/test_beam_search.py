"""The optimal-stopping beam search (user_dir/beam_search.py) against fairseq's SequenceGenerator."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import FairseqDecoder, FairseqEncoder, FairseqEncoderDecoderModel
from fairseq.sequence_generator import SequenceGenerator

from user_dir.beam_search import OptimalStopBeamSearch

from .helpers import (
    PAIRS,
    USER_DIR,
    build_model,
    generate_argv,
    make_batch,
    parse_generate_output,
    preprocess,
    run_cli,
    sharpen,
)

# A language model over {x, y} that ignores the source: next-token probabilities after each
# prefix ("" = the start). fairseq's beam 2 ends "x </s>" and "x x </s>" (each among the two
# best candidates of its step) and stops with two finished hypotheses, while "x x x" is still
# active; "x x x </s>" has the best score (greedy decoding finds it too).
TABLE = {
    "": {"x": 0.85, "y": 0.10, "</s>": 0.05},
    "x": {"x": 0.7, "</s>": 0.3},
    "y": {"y": 0.01, "</s>": 0.99},
    "x x": {"x": 0.99, "</s>": 0.01},
    "y y": {"y": 0.01, "</s>": 0.99},
    "x x x": {"x": 0.01, "</s>": 0.99},
}
OTHER = {"x": 0.01, "</s>": 0.99}


def _dictionary() -> Dictionary:
    d = Dictionary()
    d.add_symbol("x")
    d.add_symbol("y")
    return d


class _Encoder(FairseqEncoder):
    def forward(self, src_tokens, src_lengths=None):
        return {"encoder_out": [src_tokens.t().unsqueeze(-1).float()]}

    def reorder_encoder_out(self, encoder_out, new_order):
        return {"encoder_out": [encoder_out["encoder_out"][0].index_select(1, new_order)]}


class _TableDecoder(FairseqDecoder):
    """Log-probabilities from TABLE for every position of the prefix (not incremental)."""

    def forward(self, prev_output_tokens, encoder_out=None, **kwargs):
        d = self.dictionary
        out = torch.full((*prev_output_tokens.shape, len(d)), -math.inf)
        for b, row in enumerate(prev_output_tokens.tolist()):
            for t in range(len(row)):
                prefix = " ".join(d[i] for i in row[1 : t + 1])
                for word, p in TABLE.get(prefix, OTHER).items():
                    out[b, t, d.index(word)] = math.log(p)
        return out, None

    def max_positions(self):
        return 1024


class _TableModel(FairseqEncoderDecoderModel):
    def max_decoder_positions(self):
        return 1024


def _toy():
    d = _dictionary()
    model = _TableModel(_Encoder(d), _TableDecoder(d)).eval()
    sample = {"net_input": {"src_tokens": torch.tensor([[d.index("x"), d.eos()]]), "src_lengths": torch.tensor([2])}}
    return d, model, sample


def _words(d: Dictionary, tokens: torch.Tensor) -> str:
    return d.string(tokens)


def _best_by_enumeration(max_len: int, len_penalty: float = 1.0) -> tuple[str, float]:
    """The highest-scoring complete output of at most max_len words, by trying every one."""
    best = ("", -math.inf)
    for n in range(1, max_len + 1):
        for seq in itertools.product("xy", repeat=n):
            logp, prefix = 0.0, ""
            for w in (*seq, "</s>"):
                p = TABLE.get(prefix, OTHER).get(w, 0.0)
                logp = logp + math.log(p) if p > 0 else -math.inf
                prefix = f"{prefix} {w}".strip()
            score = logp / (n + 1) ** len_penalty
            if score > best[1]:
                best = (" ".join(seq), score)
    return best


def test_fairseq_beam_stops_before_the_best_hypothesis_ends_and_the_optimal_stop_finds_it():
    d, model, sample = _toy()
    expected, expected_score = _best_by_enumeration(6)
    assert expected == "x x x"

    greedy = SequenceGenerator([model], d, beam_size=1, max_len_b=6).generate([model], sample)[0][0]
    stock = SequenceGenerator([model], d, beam_size=2, max_len_b=6).generate([model], sample)[0][0]
    assert _words(d, greedy["tokens"]) == "x x x"
    assert _words(d, stock["tokens"]) == "x"  # fairseq's stopping rule: beam 2 below greedy
    assert float(stock["score"]) < expected_score - 0.5

    ours = OptimalStopBeamSearch(d, beam_size=2, max_len_b=6).generate([model], sample)[0]
    assert _words(d, ours[0]["tokens"]) == expected
    assert float(ours[0]["score"]) == pytest.approx(expected_score, abs=1e-5)
    assert float(ours[0]["positional_scores"].sum()) / 4 == pytest.approx(expected_score, abs=1e-5)
    assert [float(h["score"]) for h in ours] == sorted((float(h["score"]) for h in ours), reverse=True)
    assert len(ours) <= 2


def test_without_length_normalization_the_optimal_stop_finds_the_most_probable_output():
    d, model, sample = _toy()
    expected, expected_score = _best_by_enumeration(6, len_penalty=0.0)
    ours = OptimalStopBeamSearch(d, beam_size=2, max_len_b=6, normalize_scores=False).generate([model], sample)[0]
    assert _words(d, ours[0]["tokens"]) == expected
    assert float(ours[0]["score"]) == pytest.approx(expected_score, abs=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_on_a_transformer_the_optimal_stop_never_scores_below_fairseq_beam(data_bin, beam):
    model, task = build_model(data_bin, "sparse_transformer_tiny", "--cross-attn", "sparsemax")
    sharpen(model)
    model.eval()
    batch = make_batch(task, PAIRS)
    sample = {"net_input": {"src_tokens": batch.src_tokens, "src_lengths": batch.src_lengths}}
    tgt = task.target_dictionary
    stock = SequenceGenerator([model], tgt, beam_size=beam, max_len_a=1, max_len_b=3).generate([model], sample)
    ours = OptimalStopBeamSearch(tgt, beam_size=beam, max_len_a=1, max_len_b=3).generate([model], sample)
    for s, o in zip(stock, ours):
        assert float(o[0]["score"]) >= float(s[0]["score"]) - 1e-5
        # the reported score is the length-normalized sum of the token log-probabilities
        assert float(o[0]["score"]) == pytest.approx(
            float(o[0]["positional_scores"].sum()) / len(o[0]["tokens"]), abs=1e-5
        )


def test_bad_arguments_name_the_parameter():
    d = _dictionary()
    with pytest.raises(ValueError, match="beam_size"):
        OptimalStopBeamSearch(d, beam_size=0)
    with pytest.raises(ValueError, match="len_penalty"):
        OptimalStopBeamSearch(d, len_penalty=-1.0)
    _, model, sample = _toy()
    with pytest.raises(ValueError, match="prefix_tokens"):
        OptimalStopBeamSearch(d).generate([model], sample, prefix_tokens=torch.zeros(1, 1))


# ----------------------------------------------------------------------------- from the command line
# The toy model above as a registered fairseq model, saved as a checkpoint, decoded by
# fairseq-generate and fairseq-interactive with --task translation (fairseq's search) and with
# --task translation_optimal_stop (user_dir/tasks/translation_optimal_stop.py).

TOY_ARCH = "optimal_stop_table_toy"


class _RegisteredTableModel(_TableModel):
    @classmethod
    def build_model(cls, args, task):
        return cls(_Encoder(task.source_dictionary), _TableDecoder(task.target_dictionary))


def _register_toy() -> None:
    from fairseq.models import MODEL_REGISTRY, register_model, register_model_architecture

    if TOY_ARCH not in MODEL_REGISTRY:
        register_model(TOY_ARCH)(_RegisteredTableModel)
        register_model_architecture(TOY_ARCH, TOY_ARCH)(lambda args: None)


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A binarized one-sentence test set ("x" -> "x x x") and a checkpoint of the table model."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    _register_toy()
    corpus = tmp_path_factory.mktemp("toy-corpus")
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.src").write_text("x\n" if split == "test" else "x\ny\n")
        (corpus / f"{split}.tgt").write_text("x x x\n" if split == "test" else "x x x\ny\n")
    data = preprocess(corpus, tmp_path_factory.mktemp("toy-bin"))
    args = options.parse_args_and_arch(
        options.get_training_parser(), [str(data), "--user-dir", str(USER_DIR), "--arch", TOY_ARCH, "--cpu"]
    )
    checkpoint = data / "toy.pt"
    torch.save(
        {
            "cfg": OmegaConf.to_container(convert_namespace_to_omegaconf(args)),
            "model": {},
            "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 0}],
            "extra_state": {},
        },
        checkpoint,
    )
    return data, checkpoint


def _generate(capsys, data, checkpoint, *extra: str) -> dict[int, str]:
    capsys.readouterr()
    run_cli("generate", generate_argv(data, checkpoint, "--max-len-b", "6", *extra))
    hypos = parse_generate_output(capsys.readouterr().out)["H"]
    return {i: line.split("\t")[1] for i, line in hypos.items()}


def test_fairseq_generate_with_the_optimal_stop_task_returns_the_best_output(toy_checkpoint, capsys):
    data, checkpoint = toy_checkpoint
    expected, expected_score = _best_by_enumeration(6)
    greedy = _generate(capsys, data, checkpoint, "--beam", "1")
    stock = _generate(capsys, data, checkpoint, "--beam", "2")
    ours = _generate(capsys, data, checkpoint, "--beam", "2", "--task", "translation_optimal_stop")
    assert greedy == {0: expected}
    assert stock == {0: "x"}  # fairseq's stop: beam 2 below greedy
    assert ours == {0: expected}

    capsys.readouterr()
    run_cli("generate", generate_argv(data, checkpoint, "--max-len-b", "6", "--beam", "2",
                                      "--task", "translation_optimal_stop", "--nbest", "2"))
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines() if line.startswith("H-0")]
    assert [words for _, _, words in lines][0] == expected and len(lines) == 2
    # fairseq-generate prints scores in base 2
    assert float(lines[0][1]) == pytest.approx(expected_score / math.log(2), abs=1e-3)
    assert float(lines[0][1]) >= float(lines[1][1])


def test_fairseq_interactive_with_the_optimal_stop_task(toy_checkpoint, tmp_path, capsys):
    data, checkpoint = toy_checkpoint
    source = tmp_path / "input.txt"
    source.write_text("x\n")
    common = [str(data), "--user-dir", str(USER_DIR), "--path", str(checkpoint), "--cpu", "--input", str(source),
              "--beam", "2", "--max-len-b", "6", "--source-lang", "src", "--target-lang", "tgt"]
    out = {}
    for task in ("translation", "translation_optimal_stop"):
        capsys.readouterr()
        run_cli("interactive", [*common, "--task", task])
        out[task] = [line.split("\t")[2] for line in capsys.readouterr().out.splitlines() if line.startswith("H-")]
    assert out == {"translation": ["x"], "translation_optimal_stop": ["x x x"]}


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--print-alignment"], "--print-alignment"),
        (["--sampling", "--nbest", "3"], "--sampling"),
        (["--diverse-beam-groups", "2"], "--diverse-beam-groups"),
        (["--no-repeat-ngram-size", "2"], "--no-repeat-ngram-size"),
    ],
)
def test_the_optimal_stop_task_refuses_the_options_it_does_not_implement(toy_checkpoint, flags, named):
    data, checkpoint = toy_checkpoint
    with pytest.raises(ValueError, match=f"{named}.*translation_optimal_stop.*--task translation"):
        run_cli("generate", generate_argv(data, checkpoint, "--task", "translation_optimal_stop", *flags))
