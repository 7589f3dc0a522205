"""CTC beam search with n-gram LM fusion and phrase boosting: NeMo 3's ``beam_batch``, in numpy.

Why this algorithm: NeMo 3.0 has two CTC beam decoders that take an n-gram LM and hotwords,
``pyctcdecode`` (pure Python prefix search; pins numpy < 2; reported at seconds per utterance
with hotwords) and ``beam_batch`` (``BatchedBeamCTCComputer``: a fixed-size, frame-synchronous,
fully vectorized search with a token-level LM and a boosting tree fused in, NVIDIA's own and
the one NeMo's docs now recommend). This module is ``beam_batch``'s
``batched_beam_search_torch`` for one utterance, step for step, so that its output is NeMo's:

* every hypothesis is one CTC path (the last label, blank included, decides whether the next
  label repeats); per frame, each of the ``beam`` hypotheses is extended by every label:
  ``score + log p(label)``, plus ``beam_beta`` and ``alpha * fusion score`` for a new token (not
  blank, not a repeat; a repeat takes no fusion score);
* the ``beam`` best extensions survive (``topk``); any more than ``beam_threshold`` below the best
  are dropped; extensions that spell the same tokens and end in the same label are recombined
  by max (a Viterbi beam, not a prefix beam: CTC paths are not summed);
* at the end the LM's end-of-sentence weight (``alpha * </s>``) is added (not the boosting
  tree's: NeMo adds none for CTC), and the best raw score wins (``score_norm=False``).

All arithmetic is float32 in NeMo's order, and hypotheses are identified by NeMo's transcript
hash, so ties break as they do there. What NeMo does not return for this strategy and the
service needs is kept too: the best hypothesis's label on every frame, so that word timings
and confidences come from the chosen path exactly as they do for greedy decoding.

Cost: a frame is a handful of numpy operations on a [beam, V+1] array; the fusion models'
scores come from a per-state cache (``service.lm.Automaton.advance``). ``bench/beam.py``
measures it against the acoustic model's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.decoding import FramePath
from service.lm import Automaton

_MULTIPLIER = np.int64(6364136223846793005)  # NeMo's transcript hash (batched_beam_decoding_utils)
_INCREMENT = np.int64(1)
_NEG_INF = np.float32(-np.inf)
_MARGIN = 1e-3  # float32 rounding of the sums the short cut bounds (scores are ~1e2, an ulp ~1e-5)


@dataclass(frozen=True)
class Fusion:
    """One model fused into the beam with its weight (NeMo's ``fusion_models`` / ``_alpha``)."""

    automaton: Automaton
    alpha: float
    eos: bool  # add alpha x end-of-sentence weight at the end (an LM: yes; a boosting tree: no)


@dataclass(frozen=True)
class BeamSearch:
    """A configured search; ``__call__`` decodes one utterance's log-probabilities [T, V+1]."""

    blank_id: int
    beam_size: int = 4
    beam_beta: float = 0.0
    beam_threshold: float = 20.0
    fusions: tuple[Fusion, ...] = ()

    def __call__(self, logprobs: npt.NDArray[np.float32]) -> FramePath:
        labels = self.best_path(logprobs)[0]
        lp = np.asarray(logprobs, dtype=np.float32)
        picked = lp[np.arange(labels.shape[0]), labels] if labels.size else np.zeros(0, np.float32)
        return FramePath(labels.astype(np.int32), picked.astype(np.float32))

    def best_path(self, logprobs: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int64], float]:
        """The best hypothesis's label on every frame, and its score."""
        lp = np.ascontiguousarray(logprobs, dtype=np.float32)
        T, V1 = lp.shape
        K = self.beam_size
        blank = self.blank_id
        if blank != V1 - 1:
            raise ValueError("beam search needs the blank last (NeMo's CTC layout)")
        if T == 0:
            return np.zeros(0, np.int64), 0.0
        vocab = np.arange(V1)
        threshold = np.float32(self.beam_threshold)
        # beta on every label but blank; a hypothesis's last label is masked off per frame below.
        # Adding an exact 0 leaves a float32 sum unchanged, so masks reproduce NeMo's where().
        beta_row = np.where(vocab == blank, np.float32(0), np.float32(self.beam_beta)).astype(np.float32)
        use_beta = self.beam_beta != 0.0
        # Blank frames take a short cut: when even the best conceivable non-blank extension (best
        # hypothesis + best non-blank label + the largest bonus any fusion model can give) scores
        # below every hypothesis's blank extension, those K blank extensions are exactly the top K
        # and no fusion state moves. The bound is strict, so the result is the full step's.
        bonus = max(0.0, self.beam_beta) + sum(max(0.0, f.alpha * f.automaton.max_score) for f in self.fusions)
        best_token = lp[:, :blank].max(axis=1) + np.float32(bonus + _MARGIN)
        blank_lp = lp[:, blank]
        scores = np.full(K, _NEG_INF, np.float32)
        scores[0] = 0.0
        last = np.full(K, -1, np.int64)
        hashes = np.zeros(K, np.int64)
        lengths = np.zeros(K, np.int64)
        nf = len(self.fusions)
        states = [np.full(K, f.automaton.start_state, np.int64) for f in self.fusions]
        # Per fusion model, the current hypotheses' rows: alpha x scores [K, V] and next states.
        rows_cache: list[dict[int, tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]]] = [{} for _ in range(nf)]

        def row(m: int, state: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
            hit = rows_cache[m].get(state)
            if hit is None:
                f = self.fusions[m]
                sc, nx = f.automaton.advance(state)
                hit = rows_cache[m][state] = (np.append(np.float32(f.alpha) * sc, np.float32(0)), nx)
            return hit

        fscore = [np.repeat(row(m, self.fusions[m].automaton.start_state)[0][None, :], K, axis=0) for m in range(nf)]
        # (blank gets no fusion score: its column stays 0, and x + 0 is x in float32)
        fnext = [np.repeat(row(m, self.fusions[m].automaton.start_state)[1][None, :], K, axis=0) for m in range(nf)]
        ptrs = np.empty((T, K), np.int64)
        labs = np.empty((T, K), np.int64)
        rows = np.arange(K)
        blanks = np.full(K, blank, np.int64)
        no_ext = np.zeros(K, bool)
        for t in range(T):
            stay = blank_lp[t] + scores
            if stay.min() > scores.max() + best_token[t]:  # all K hypotheses live; blank wins for each
                idx = np.argsort(-stay, kind="stable")
                new_scores, lab, extended = stay[idx], blanks, no_ext
            else:
                cand = lp[t] + scores[:, None]
                nonrep = vocab != last[:, None]
                if use_beta:
                    cand += beta_row * nonrep
                for m in range(nf):
                    cand += fscore[m] * nonrep
                flat = cand.ravel()
                top = np.argpartition(flat, -K)[-K:]
                top = top[np.argsort(-flat[top], kind="stable")]
                new_scores = flat[top]
                idx, lab = np.divmod(top, V1)
                extended = (lab != blank) & (lab != last[idx])
            new_scores[new_scores <= new_scores.max() - threshold] = _NEG_INF
            ptrs[t], labs[t] = idx, lab
            last = lab
            scores = new_scores
            if extended.any():
                lengths = lengths[idx] + extended
                prev_hash = hashes[idx]
                # int64 arrays wrap silently on overflow, as torch's do: NeMo's hash arithmetic
                hashes = np.where(extended, prev_hash * _MULTIPLIER + _INCREMENT + lab, prev_hash)
                for m in range(nf):
                    moved = fnext[m][idx, np.where(extended, lab, 0)]
                    states[m] = np.where(extended, moved, states[m][idx])
                    fscore[m], fnext[m] = fscore[m][idx], fnext[m][idx]
                    for j in np.flatnonzero(extended):
                        fscore[m][j], fnext[m][j] = row(m, int(states[m][j]))
            else:
                lengths, hashes = lengths[idx], hashes[idx]
                for m in range(nf):
                    states[m], fscore[m], fnext[m] = states[m][idx], fscore[m][idx], fnext[m][idx]
            if K > 1:  # recombine: same tokens, same last label -> keep the best of them
                same = hashes[:, None] == hashes[None, :]
                if same.sum() > K:
                    same &= (last[:, None] == last[None, :]) & (lengths[:, None] == lengths[None, :])
                    matrix = np.where(same, scores[None, :], _NEG_INF)
                    keep = matrix.argmax(axis=1) == rows
                    scores = np.where(keep, matrix.max(axis=1), _NEG_INF).astype(np.float32)
        for f, st in zip(self.fusions, states, strict=True):
            if f.eos:
                scores = (scores + np.float32(f.alpha) * f.automaton.final[st]).astype(np.float32)
        k = int(np.argmax(scores))
        best = float(scores[k])
        path = np.empty(T, np.int64)
        for t in range(T - 1, -1, -1):
            path[t] = labs[t, k]
            k = int(ptrs[t, k])
        return path, best
