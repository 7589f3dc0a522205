"""Token-level against word-level n-gram LM on the default model: the WER each gives in beam search.

The service's LM is token-level (NeMo's convention for BPE models; ``service/lm.py``). A
word-level LM scores whole words; fused into the same frame-synchronous CTC beam search
(``service.beam.BeamSearch``) it becomes a lazily built automaton over tokens, as pyctcdecode
and flashlight fuse word LMs: a hypothesis's state is (the word LM's state, the tokens of the word
being spelled); a token that starts a word (SentencePiece's U+2581) completes the word before it
and is scored log P(word | history) (a word the LM lacks: its ``<unk>`` weight); other tokens
score 0, unless the word being spelled stops being the beginning of any word the LM knows: then
it pays the ``<unk>`` weight at once (pyctcdecode's prefix check), not again when it completes; at
the end the last word and ``</s>`` are scored. Known words are scored one word late, as in those
decoders; out-of-vocabulary spellings stay possible at the ``<unk>`` price.

This is a measurement, not a served decoder: ``python -m bench.word_lm`` estimates a word 4-gram
and a token 6-gram from the same training text (``training/ngram.py``), chooses each one's LM
weight and word bonus on the validation set, and prints the test sets' WER side by side
(``bench/results/word_lm.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.beam import DATA, LM_DIR, RESULTS, SETS, decode_all, recognizer, set_logprobs, token_lm, wer
from bench.common import cpu_info
from service.beam import BeamSearch, Fusion
from service.decoding import SPACE_PIECE
from service.lm import NEMO_NEG_INF, Automaton, NGramLM

_LOG10_E = float(np.log10(np.e))


class WordNGram:
    """A word-level ARPA model with scalar queries (a word LM's vocabulary is too large for
    ``Automaton.advance``'s whole-vocabulary rows)."""

    def __init__(self, path: Path):
        self.words: dict[str, int] = {}
        ngrams: list[tuple[int, tuple[int, ...], float, float]] = []
        order = 0
        special = {"<s>": -1, "</s>": -2, "<unk>": -3}
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                m = re.match(r"\\(\d+)-grams:", line)
                if m:
                    order = int(m.group(1))
                    continue
                if not order or not line or line.startswith("\\"):
                    continue
                parts = line.split("\t")
                ids = []
                for w in parts[1].split(" "):
                    if w in special:
                        ids.append(special[w])
                    else:
                        ids.append(self.words.setdefault(w, len(self.words)))
                bo = float(parts[2]) / _LOG10_E if len(parts) > 2 else 0.0
                ngrams.append((order, tuple(ids), float(parts[0]) / _LOG10_E, bo))
        max_order = max(o for o, *_ in ngrams)
        self.lm = NGramLM._build(iter(ngrams), max_order, len(self.words), False, path)
        self.auto: Automaton = self.lm.automaton
        unk = [w for o, s, w, _ in ngrams if o == 1 and s == (-3,)]
        self.unk = unk[0] if unk else -20.0

    def step(self, state: int, word: int | None) -> tuple[float, int]:
        """log P(word | state) and the next state, following backoffs (None: ``<unk>``)."""
        a = self.auto
        if word is None:
            return self.unk, 0
        acc, cur = 0.0, state
        while True:
            lo, hi = int(a.arc_start[cur]), int(a.arc_end[cur])
            i = lo + int(np.searchsorted(a.arc_label[lo:hi], word))
            if i < hi and int(a.arc_label[i]) == word:
                return acc + float(a.arc_weight[i]), int(a.arc_to[i])
            if cur == 0:
                return self.unk, 0
            acc += float(a.backoff_w[cur])
            cur = int(a.backoff_to[cur])

    def final(self, state: int) -> float:
        return float(self.auto.final[state])


class WordFusion:
    """The word LM as an automaton over tokens, built lazily (the interface ``BeamSearch`` uses)."""

    def __init__(self, lm: WordNGram, pieces: list[str], detok: Any):
        self.lm = lm
        self.vocab_size = len(pieces)
        self.starts_word = np.array([p.startswith(SPACE_PIECE) for p in pieces])
        self.detok = detok
        self.states: dict[tuple[int, tuple[int, ...]], int] = {}
        self.keys: list[tuple[int, tuple[int, ...]]] = []
        self.prefixes = {w[:i] for w in lm.words for i in range(1, len(w) + 1)}
        self.piece_text = [p.replace(SPACE_PIECE, "") for p in pieces]
        self._cache: dict[int, tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]] = {}
        self.start_state = self._intern((1, ()))  # the word LM's <s> state, no word begun
        self.max_score = 0.0  # log-probabilities; backoffs of this LM are checked below
        if float(lm.auto.backoff_w.max()) > 0:
            self.max_score = float(lm.auto.backoff_w.max()) * lm.lm.max_order
        self.final = _Finals(self)

    def _intern(self, key: tuple[int, tuple[int, ...]]) -> int:
        s = self.states.get(key)
        if s is None:
            s = self.states[key] = len(self.keys)
            self.keys.append(key)
        return s

    def _text(self, partial: tuple[int, ...]) -> str:
        """The word being spelled: its pieces joined, without SentencePiece's word-boundary mark."""
        return "".join(self.piece_text[v] for v in partial)

    def _complete(self, lm_state: int, partial: tuple[int, ...]) -> tuple[float, int]:
        if not partial:
            return 0.0, lm_state
        text = self._text(partial)
        word = self.lm.words.get(text)
        if word is None and text not in self.prefixes:  # its <unk> weight was paid when it left the prefixes
            return 0.0, self.lm.step(lm_state, None)[1]
        return self.lm.step(lm_state, word)

    def advance(self, state: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
        hit = self._cache.get(state)
        if hit is not None:
            return hit
        lm_state, partial = self.keys[state]
        score, after = self._complete(lm_state, partial)
        scores = np.where(self.starts_word & bool(partial), np.float32(score), np.float32(0)).astype(np.float32)
        nxt = np.empty(self.vocab_size, np.int32)
        known = not partial or self._text(partial) in self.prefixes
        for v in range(self.vocab_size):
            if self.starts_word[v]:
                nxt[v] = self._intern((after, (v,)))
            else:
                longer = (*partial, v)
                nxt[v] = self._intern((lm_state, longer))
                if known and self._text(longer) not in self.prefixes:
                    scores[v] = self.lm.unk  # leaves every known word here: <unk> now
        self._cache[state] = (scores, nxt)
        return scores, nxt


class _Finals:
    def __init__(self, fusion: WordFusion):
        self.f = fusion

    def __getitem__(self, states: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        out = []
        for s in states:
            lm_state, partial = self.f.keys[int(s)]
            score, after = self.f._complete(lm_state, partial)
            fin = self.f.lm.final(after)
            out.append(score + (fin if fin > NEMO_NEG_INF else 0.0))
        return np.array(out, np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--word-order", type=int, default=4)
    p.add_argument("--beam", type=int, default=8)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    args = p.parse_args()
    from training.ngram import build_arpa, read_sentences

    rec = recognizer()
    word_path = LM_DIR / f"words-o{args.word_order}.arpa"
    if not word_path.exists():
        sentences = read_sentences([DATA / "text" / "train.txt", DATA / "text" / "wordnet.txt"])
        build_arpa([s.split() for s in sentences], args.word_order, word_path)
    word_lm = WordNGram(word_path)
    token = NGramLM.from_arpa(token_lm(rec, 6, [0, 0, 1, 1, 2, 2]), rec.blank_id)
    data = {s: set_logprobs(rec, s) for s in SETS}
    val_lp, val_refs = data["val"]

    def word_search(alpha: float, beta: float) -> BeamSearch:
        fusion = WordFusion(word_lm, rec.detokenize.pieces, rec.detokenize)
        return BeamSearch(rec.blank_id, args.beam, beta, 20.0, (Fusion(fusion, alpha, True),))  # type: ignore[arg-type]

    def token_search(alpha: float, beta: float) -> BeamSearch:
        return BeamSearch(rec.blank_id, args.beam, beta, 20.0, (Fusion(token.automaton, alpha, True),))

    out: dict[str, Any] = {"machine": cpu_info(), "word_arpa_bytes": word_path.stat().st_size, "grid": {}}
    chosen = {}
    for name, make in (("word 4-gram", word_search), ("token 6-gram (pruned, the package's)", token_search)):
        best = (math.inf, 0.0, 0.0)
        for a in args.alphas:
            for b in args.betas:
                w = wer(val_refs, decode_all(rec, val_lp, make(a, b)))
                out["grid"].setdefault(name, []).append({"alpha": a, "beta": b, "val_wer": w})
                print(f"{name} alpha {a} beta {b}: val {100 * w:.2f} %", flush=True)
                best = min(best, (w, a, b))
        chosen[name] = best
    out["chosen"] = {k: {"val_wer": v[0], "alpha": v[1], "beta": v[2]} for k, v in chosen.items()}
    out["wer"] = {}
    for s in SETS:
        lps, refs = data[s]
        row = {k: wer(refs, decode_all(rec, lps, (word_search if k.startswith("word") else token_search)(a, b)))
               for k, (_, a, b) in chosen.items()}  # fmt: skip
        out["wer"][s] = row
        print(s, {k: f"{100 * v:.2f} %" for k, v in row.items()}, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "word_lm.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
