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

from .helpers import PAIRS, build_model, make_batch, sharpen

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
