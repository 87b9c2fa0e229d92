"""Beam search that stops a sentence only when no active hypothesis can still beat the best finished one.

fairseq's ``SequenceGenerator`` stops a sentence as soon as ``beam_size`` hypotheses have ended.
On a small, peaked vocabulary, early end-of-sentence candidates of low probability fill that
list while a better hypothesis is still active, and beam search returns a worse translation
than greedy decoding (docs/fairseq.md has the measurement). :class:`OptimalStopBeamSearch`
keeps the same beam (the ``beam_size`` best non-final extensions per step, as fairseq) but

- ends every active hypothesis with ``</s>`` as a finished candidate at each step (fairseq
  only ends those among the ``beam_size`` best candidates), and
- stops a sentence only when the best finished score is at least an upper bound of the score
  of any completion of any active hypothesis (the optimal stopping criterion of Huang, Zhao
  and Ma 2017, "When to finish? Optimal beam search for neural text generation").

Scores are fairseq's: the sum of token log-probabilities, divided by ``length ** len_penalty``
(length counts ``</s>``). Log-probabilities are <= 0, so a hypothesis with raw score ``s`` can
at best end with score ``s`` at the longest allowed length: the bound is
``s / (max_len + 1) ** len_penalty`` (``s`` itself without normalization or with
``len_penalty = 0``). Its beam is fairseq's beam, its finished set contains fairseq's, and it
stops no earlier than the bound allows, so its best score is never below fairseq's.

    from user_dir.beam_search import OptimalStopBeamSearch
    search = OptimalStopBeamSearch(tgt_dict, beam_size=5, max_len_a=1.5, max_len_b=10)
    hypos = task.inference_step(search, models, sample)   # or search.generate(models, sample)

The result has fairseq's layout: per sentence, a list of up to ``beam_size`` dicts with
``tokens`` (ending in ``</s>``), ``score`` and ``positional_scores``, best first (and
``attention`` and ``alignment``, always None). From the command line, ``--task
translation_optimal_stop`` (``user_dir/tasks/translation_optimal_stop.py``) makes
fairseq-generate and fairseq-interactive decode with it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .compat import IncrementalState, ensemble


class OptimalStopBeamSearch(nn.Module):
    """Beam search with the optimal stopping rule (see the module docstring).

    Parameters
    ----------
    tgt_dict : the target dictionary (``eos``, ``pad``, ``unk`` indices).
    beam_size : hypotheses kept per sentence (>= 1).
    max_len_a, max_len_b : the longest output is ``max_len_a * source_length + max_len_b``
        tokens before ``</s>`` (fairseq's meaning), capped by the model's positions.
    min_len : ``</s>`` is forbidden before this many tokens (fairseq's default 1).
    normalize_scores, len_penalty : fairseq's length normalization ``score / length ** len_penalty``.
    """

    def __init__(
        self,
        tgt_dict: Any,
        beam_size: int = 5,
        max_len_a: float = 0.0,
        max_len_b: int = 200,
        min_len: int = 1,
        normalize_scores: bool = True,
        len_penalty: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
        if len_penalty < 0:
            raise ValueError(
                f"len_penalty must be >= 0 for the stopping bound (a negative one rewards length without limit), "
                f"got {len_penalty!r}"
            )
        if min_len < 0 or max_len_b < 0 or max_len_a < 0:
            raise ValueError(
                f"min_len, max_len_a and max_len_b must be >= 0, got {min_len!r}, {max_len_a!r}, {max_len_b!r}"
            )
        self.eos, self.pad, self.unk = tgt_dict.eos(), tgt_dict.pad(), tgt_dict.unk()
        self.vocab_size = len(tgt_dict)
        self.beam_size = beam_size
        self.max_len_a, self.max_len_b, self.min_len = max_len_a, max_len_b, min_len
        self.len_penalty = len_penalty if normalize_scores else 0.0

    def _normalize(self, raw: Tensor, length: int) -> Tensor:
        return raw / float(length) ** self.len_penalty

    @torch.no_grad()
    def generate(self, models: list[nn.Module], sample: dict[str, Any], **kwargs: Any) -> list[list[dict[str, Tensor]]]:
        """Translate ``sample["net_input"]`` (``src_tokens``, ``src_lengths``); see the class docstring.

        ``prefix_tokens``, ``constraints`` and ``bos_token`` (fairseq's extras) are not supported.
        """
        for key in ("prefix_tokens", "constraints", "bos_token"):
            if kwargs.get(key) is not None:
                raise ValueError(f"OptimalStopBeamSearch.generate: {key} is not supported")
        model = ensemble(models).eval()
        net_input = sample["net_input"]
        src_tokens = net_input["src_tokens"]
        bsz, src_len = src_tokens.shape[:2]
        K, V, eos = self.beam_size, self.vocab_size, self.eos
        max_len = min(int(self.max_len_a * src_len + self.max_len_b), model.max_decoder_positions() - 1)
        if max_len < self.min_len:
            raise ValueError(f"max_len ({max_len}) is below min_len ({self.min_len}): raise max_len_a / max_len_b")
        model.set_decoder_beam_size(K)
        incremental: list[IncrementalState] = [{} for _ in range(model.models_size)]
        enc = model.forward_encoder(net_input)
        order = torch.arange(bsz, device=src_tokens.device).repeat_interleave(K)
        enc = model.reorder_encoder_out(enc, order)

        tokens = torch.full((bsz * K, max_len + 2), self.pad, dtype=torch.long, device=src_tokens.device)
        tokens[:, 0] = eos
        positional = torch.zeros(bsz * K, max_len + 1, device=src_tokens.device)
        scores = torch.full((bsz, K), -math.inf, device=src_tokens.device)
        scores[:, 0] = 0.0  # one live hypothesis (the empty prefix) per sentence at the start
        finished: list[list[dict[str, Tensor]]] = [[] for _ in range(bsz)]
        best = torch.full((bsz,), -math.inf, device=src_tokens.device)
        done = torch.zeros(bsz, dtype=torch.bool, device=src_tokens.device)
        offsets = (torch.arange(bsz, device=src_tokens.device) * K)[:, None]

        for step in range(max_len + 1):
            lprobs, _ = model.forward_decoder(tokens[:, : step + 1], enc, incremental)
            lprobs = lprobs.float()
            lprobs[lprobs != lprobs] = -math.inf
            lprobs[:, self.pad] = -math.inf
            if step < self.min_len:
                lprobs[:, eos] = -math.inf
            if step == max_len:  # the last step may only end hypotheses
                keep = lprobs[:, eos].clone()
                lprobs.fill_(-math.inf)
                lprobs[:, eos] = keep
            cand = scores.reshape(-1, 1) + lprobs  # (bsz * K, V)

            # every live hypothesis ended here is a finished candidate
            ended = cand[:, eos].view(bsz, K)
            ended_norm = self._normalize(ended, step + 1)
            for b, k in (torch.isfinite(ended) & ~done[:, None]).nonzero().tolist():
                row = b * K + k
                hyp_tokens = torch.cat([tokens[row, 1 : step + 1], tokens.new_tensor([eos])])
                hyp_pos = torch.cat([positional[row, :step], lprobs[row, eos : eos + 1]])
                finished[b].append({
                    "tokens": hyp_tokens,
                    "score": ended_norm[b, k],
                    "positional_scores": hyp_pos,
                    "attention": None,  # fairseq's keys; its command-line tools read "alignment"
                    "alignment": None,
                })
            if any(len(f) > K for f in finished):
                finished = [sorted(f, key=lambda h: -float(h["score"]))[:K] for f in finished]
            best = torch.maximum(best, torch.where(done[:, None], -math.inf, ended_norm).max(1).values)
            if step == max_len:
                break

            # the beam: the K best extensions that do not end
            cand[:, eos] = -math.inf
            top, idx = cand.view(bsz, K * V).topk(K, dim=1)
            beam, word = idx // V, idx % V
            rows = (offsets + beam).view(-1)
            tokens = tokens[rows]
            tokens[:, step + 1] = word.view(-1)
            positional = positional[rows]
            positional[:, step] = lprobs[rows, word.view(-1)]
            model.reorder_incremental_state(incremental, rows)
            scores = top

            # stop a sentence when no completion of a live hypothesis can beat its best finished one
            bound = self._normalize(scores.max(1).values, max_len + 1) if self.len_penalty > 0 else scores.max(1).values
            done |= best >= bound
            scores = scores.masked_fill(done[:, None], -math.inf)
            if bool(done.all()):
                break

        return [sorted(f, key=lambda h: -float(h["score"])) for f in finished]
