"""An offline n-gram language model estimator that writes ARPA files (no KenLM, no download).

Why this exists: the shallow-fusion decoders (NeMo's ``NGramGPULanguageModel.from_arpa``, pyctcdecode,
...) read ARPA files, and the usual way to make one, KenLM's ``lmplz``, is not available on the
machines this project is built on. This module reimplements what ``lmplz`` estimates, interpolated
modified Kneser-Ney (Heafield, Pouzyrevsky, Clark and Koehn 2013, "Scalable modified Kneser-Ney
language model estimation"; Chen and Goodman 1998, eq. 26), with numpy, in memory: a million words
is small enough that the disk-based streaming of ``lmplz`` is not needed.

The estimate, step by step (each as ``lmplz`` does it, so its ARPA files are interchangeable):

* every sentence is wrapped in ``<s> ... </s>``; n-grams never cross sentences;
* counts: the highest order keeps its raw counts; a lower-order n-gram gets its *adjusted*
  (continuation) count, the number of distinct words seen to its left, because it is only ever
  used when backing off from a longer context, where what matters is how many contexts it
  completes, not how often it occurs. N-grams that start with ``<s>`` have no left context to
  count and keep their raw counts; the unigram ``<s>`` has count 0 (it is never predicted);
* discounts per order from the counts-of-counts n1..n4 of those counts:
  ``Y = n1 / (n1 + 2 n2)``, ``D_k = k - (k+1) Y n_{k+1} / n_k`` for k = 1, 2, 3 (3 means 3+);
* ``p(w | ctx) = (a(ctx w) - D(a)) / sum_x a(ctx x) + gamma(ctx) p(w | ctx')`` with ``ctx'`` the
  context without its first word and ``gamma(ctx) = (D1 N1(ctx .) + D2 N2(ctx .) + D3 N3+(ctx .)) /
  sum_x a(ctx x)`` the mass the discounts took; the unigrams interpolate with the uniform
  distribution over the vocabulary *including* ``<unk>`` (and excluding ``<s>``), so ``<unk>``,
  never seen, gets ``gamma() / |V|``;
* written in backoff form: each n-gram's ARPA probability is its interpolated probability and a
  context's backoff weight is ``gamma(ctx)``. Since the interpolated probabilities of the words
  seen after ``ctx`` plus ``gamma(ctx)`` sum to 1, a backoff query gives the same distribution as
  the interpolated model. ``<s>`` gets log10 probability -99 (it is never predicted).

Count pruning (``prune``, ``lmplz --prune``) drops the n-grams of an order whose count (the one the
estimate uses: adjusted below the highest order, raw at it) is at most a threshold, so that a model
fits a size budget. Two rules keep the result a valid ARPA file that sums to 1:

* closure: a kept n-gram keeps its prefix (its context, which must carry the backoff weight) and
  its suffix (what it backs off to; NeMo's loader and KenLM's look both up);
* the counts a pruned n-gram had go to its context's backoff: ``gamma(ctx) = (sum over kept
  D(a) + sum over pruned a) / sum a``, as ``lmplz`` does, so each context's kept probabilities plus
  its backoff mass still sum to 1. The discounts stay those of the unpruned counts.

Token-level models (NeMo's convention for BPE/SentencePiece ASR models): each sentence is encoded
into SentencePiece ids and id ``i`` is written as the single character ``chr(i + 100)`` (NeMo's
``DEFAULT_TOKEN_OFFSET``), see :func:`tokenize_for_lm`. Some of those characters (ids 27-60:
U+007F-U+00A0) are control characters or no-break space: a reader must split ARPA lines on tab and
on the plain space only (``line.split("\\t")``, ``words.split(" ")``), never on "any whitespace".

Measured on this project's 2-core build machine (train.txt + wordnet.txt: 64 549 sentences, 520 k
words; the CLI prints its timings): token level, order 6, 1.67 M tokens, 2.5 M n-grams, 79 MB ARPA
in 4.3 s (count 1.8 s, write 2.1 s; 0.75 GB peak); word level, order 4, 1.1 M n-grams, 40 MB in
1.6 s. Checked against NeMo: ``NGramGPULanguageModel.from_arpa`` loads the token-level files and
scores text exactly as the backoff query of :func:`arpa_perplexity` does.

Usage:
    python -m training.ngram --text training/data/text/train.txt --text training/data/text/wordnet.txt \\
        --order 6 --spm tokens/en_synth_conformer_ctc.model --out .cache/lm/tokens6.arpa \\
        [--prune 0 0 1 1] [--eval training/data/text/test.txt]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0  # word ids: <unk>, <s>, </s> first, then words as first seen
TOKEN_OFFSET = 100  # NeMo's DEFAULT_TOKEN_OFFSET: token id i is the symbol chr(i + 100)
# lmplz --discount_fallback's default: used for an order whose counts-of-counts cannot give
# discounts (tiny or artificial corpora), where lmplz would stop with BadDiscountException.
DISCOUNT_FALLBACK = (0.5, 1.0, 1.5)
BOS_LOGPROB = -99.0

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass
class NGramCounts:
    """All n-grams of orders 1..order of a corpus, as parallel numpy arrays per order.

    Order ``k`` (index ``k - 1`` in each list) has one entry per distinct k-gram. The unigram
    entries are the vocabulary itself (entry i is word id i, ``<unk>`` and ``<s>`` included, with
    count 0 when unseen). For k >= 2, ``prefix[k-1][i]`` indexes the (k-1)-gram of its first k-1
    words (its context) and ``suffix[k-1][i]`` the (k-1)-gram of its last k-1 words (what it backs
    off to), both in order k-1's arrays; ``word`` is its last word id and ``first`` its first. The
    n-grams of an order are sorted by (prefix, word). Indices instead of tuples keep a million-word
    corpus at order 6 in a few hundred MB and let every step below be a numpy gather or bincount.
    """

    vocab: list[str]
    order: int
    prefix: list[IntArray]
    suffix: list[IntArray]
    word: list[IntArray]
    first: list[IntArray]
    raw: list[IntArray]
    adjusted: list[IntArray]
    sentences: int
    tokens: int  # words (or tokens) plus one </s> per sentence: what a perplexity is averaged over

    def texts(self, k: int) -> list[str]:
        """The n-grams of order ``k`` as space-joined words, in entry order."""
        out: list[str] = list(self.vocab)
        for j in range(2, k + 1):
            out = _extend_texts(out, self.vocab, self.prefix[j - 1], self.word[j - 1])
        return out

    def as_dicts(self, kind: str = "adjusted") -> list[dict[tuple[str, ...], int]]:
        """``kind`` ("raw" or "adjusted") counts per order as ``{(w1, ..., wk): count}``, for
        inspection and tests (entries with count 0, the unseen ``<unk>`` and ``<s>``, left out)."""
        table = self.raw if kind == "raw" else self.adjusted
        out = []
        for k in range(1, self.order + 1):
            counts = table[k - 1].tolist()
            out.append({tuple(t.split(" ")): c for t, c in zip(self.texts(k), counts, strict=True) if c > 0})
        return out


def _extend_texts(prev: list[str], vocab: list[str], prefix: IntArray, word: IntArray) -> list[str]:
    """Texts of order k from order k-1's: the prefix's text, a space, the last word."""
    return [f"{prev[p]} {vocab[w]}" for p, w in zip(prefix.tolist(), word.tolist(), strict=True)]


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> NGramCounts:
    """Raw and adjusted counts of every n-gram of orders 1..``order`` of ``<s> sentence </s>``.

    Each order's n-grams are found by one ``np.unique`` over integer keys ``prefix_index * |V| +
    word``: the k-gram ending at a position is the (k-1)-gram ending one position earlier plus
    this position's word, so keys stay below ``n_{k-1} * |V|`` (no overflow at any order) and
    the sort is numpy's, not Python's.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, not {order}")
    vocab = [UNK, BOS, EOS]
    index = {w: i for i, w in enumerate(vocab)}
    stream: list[int] = []
    lengths: list[int] = []
    for sent in sentences:
        ids = [BOS_ID]
        for w in sent:
            i = index.get(w)
            if i is None:
                i = index[w] = len(vocab)
                vocab.append(w)
            elif i in (BOS_ID, EOS_ID):
                raise ValueError(f"{w} inside a sentence: sentences are given without <s> and </s>")
            ids.append(i)
        ids.append(EOS_ID)
        stream.extend(ids)
        lengths.append(len(ids))
    if not lengths:
        raise ValueError("no sentences")
    v = len(vocab)
    tok = np.asarray(stream, dtype=np.int64)
    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    # Position of each symbol in its own sentence; <s> is at 0.
    offset = np.arange(len(tok), dtype=np.int64) - np.repeat(starts, lens)

    body = offset >= 1  # every symbol but <s>: what a unigram is counted on
    raw1 = np.bincount(tok[body], minlength=v).astype(np.int64)
    ar = np.arange(v, dtype=np.int64)
    none = np.full(v, -1, dtype=np.int64)
    prefix, suffix, word, first, raw = [none], [none], [ar], [ar], [raw1]
    ids_prev = tok  # index of the (k-1)-gram ending at each position (unigram index == word id)
    for k in range(2, order + 1):
        pos = np.flatnonzero(offset >= k - 1)  # the k-gram ending here stays inside the sentence
        keys = ids_prev[pos - 1] * v + tok[pos]
        uniq, inv, cnt = np.unique(keys, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        pre = uniq // v
        suf = np.empty(len(uniq), dtype=np.int64)
        suf[inv] = ids_prev[pos]  # the last k-1 words: the (k-1)-gram ending at the same position
        prefix.append(pre)
        suffix.append(suf)
        word.append(uniq % v)
        first.append(first[-1][pre])
        raw.append(cnt.astype(np.int64))
        ids_k = np.full(len(tok), -1, dtype=np.int64)
        ids_k[pos] = inv
        ids_prev = ids_k

    adjusted = list(raw)
    for k in range(1, order):
        # Distinct left extensions: each (k+1)-gram adds one to the k-gram that is its suffix.
        left = np.bincount(suffix[k], minlength=len(raw[k - 1])).astype(np.int64)
        adjusted[k - 1] = np.where(first[k - 1] == BOS_ID, raw[k - 1], left)
    return NGramCounts(
        vocab=vocab,
        order=order,
        prefix=prefix,
        suffix=suffix,
        word=word,
        first=first,
        raw=raw,
        adjusted=adjusted,
        sentences=len(lengths),
        tokens=int(body.sum()),
    )


def discounts(counts: IntArray, fallback: Sequence[float] | None = DISCOUNT_FALLBACK) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts (D1, D2, D3+) of one order from its counts-of-counts.

    Chen and Goodman's estimate, as lmplz computes it. When a count of counts it divides by is 0
    or a discount falls outside (0, k], lmplz stops (unless ``--discount_fallback``); here the
    fallback is used (None: raise), since tiny corpora (tests, a new domain's first sentences)
    hit this and the fallback is what lmplz would be told to use.
    """
    d = _estimated_discounts(counts)
    if d is not None:
        return d
    if fallback is None:
        n = np.bincount(counts[(counts >= 1) & (counts <= 4)], minlength=5)
        raise ValueError(f"cannot estimate Kneser-Ney discounts from counts-of-counts n1..n4 = {n[1:5].tolist()}")
    return (float(fallback[0]), float(fallback[1]), float(fallback[2]))


def _estimated_discounts(counts: IntArray) -> tuple[float, float, float] | None:
    n = np.bincount(counts[(counts >= 1) & (counts <= 4)], minlength=5)
    n1, n2, n3, n4 = (float(x) for x in n[1:5])
    if n1 > 0 and n2 > 0 and n3 > 0:
        y = n1 / (n1 + 2 * n2)
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0 < dk <= k for k, dk in enumerate(d, 1)):
            return d
    return None


def _discount_of(a: IntArray, d: tuple[float, float, float]) -> FloatArray:
    table = np.array([0.0, d[0], d[1], d[2]])
    return table[np.minimum(a, 3)]


def _prune_masks(c: NGramCounts, thresholds: list[int]) -> list[npt.NDArray[np.bool_]]:
    """Which n-grams survive count pruning, closed under prefix and suffix (see module docstring)."""
    keep = [np.ones(len(c.raw[0]), dtype=bool)]
    for k in range(2, c.order + 1):
        keep.append(c.adjusted[k - 1] > thresholds[k - 1])
    for k in range(c.order, 1, -1):  # top down, so a forced n-gram forces its own prefix/suffix too
        kept = keep[k - 1]
        keep[k - 2][c.prefix[k - 1][kept]] = True
        keep[k - 2][c.suffix[k - 1][kept]] = True
    return keep


def _fmt(x: float) -> str:
    return f"{x:.7g}"


def estimate(
    c: NGramCounts, prune: Sequence[int] | None = None, discount_fallback: Sequence[float] | None = DISCOUNT_FALLBACK
) -> tuple[list[FloatArray], list[FloatArray], list[npt.NDArray[np.bool_]], list[tuple[float, float, float]]]:
    """Interpolated modified Kneser-Ney from counts: per order, each n-gram's log10 probability,
    log10 backoff (0 where it is no context), whether it is kept, and the order's discounts."""
    n = c.order
    thresholds = [0] * n
    if prune:
        thresholds = [int(prune[min(k, len(prune) - 1)]) for k in range(n)]  # last value repeats, as lmplz
        if thresholds[0] != 0:
            raise ValueError("unigrams cannot be pruned (prune[0] must be 0), as in lmplz")
    keep = _prune_masks(c, thresholds) if any(thresholds) else [np.ones(len(a), dtype=bool) for a in c.raw]
    disc = [discounts(c.adjusted[k - 1], discount_fallback) for k in range(1, n + 1)]

    a1 = c.adjusted[0]
    d1 = _discount_of(a1, disc[0])
    total = float(a1.sum())
    gamma0 = float(d1.sum()) / total
    uniform = 1.0 / (len(c.vocab) - 1)  # the vocabulary with <unk>, without <s>: lmplz's |V|
    probs = [(a1 - d1) / total + gamma0 * uniform]
    gammas: list[FloatArray] = []
    for k in range(2, n + 1):
        a = c.adjusted[k - 1]
        pre = c.prefix[k - 1]
        d = _discount_of(a, disc[k - 1])
        n_ctx = len(c.raw[k - 2])
        denom = np.bincount(pre, weights=a, minlength=n_ctx)
        # The mass the context gives away: the discounts of kept n-grams, all of a pruned one's count.
        freed = np.bincount(pre, weights=np.where(keep[k - 1], d, a), minlength=n_ctx)
        gamma = np.ones(n_ctx)
        has = denom > 0
        gamma[has] = freed[has] / denom[has]
        gammas.append(gamma)
        probs.append((a - d) / denom[pre] + gamma[pre] * probs[-1][c.suffix[k - 1]])
    with np.errstate(divide="ignore"):
        # min(0): a probability of 1 computed as 1 + 1e-16 stays 0 in log10, as lmplz clamps it.
        logp = [np.minimum(np.log10(p), 0.0) for p in probs]
        logb = [np.log10(g) for g in gammas] + [np.zeros(len(c.raw[n - 1]))]
    logp[0][BOS_ID] = BOS_LOGPROB
    for k in range(1, n):
        b = logb[k - 1]
        # Not contexts: n-grams ending in </s> or <unk> (lmplz writes no backoff for them either).
        b[(c.word[k - 1] == EOS_ID) | (c.word[k - 1] == UNK_ID) | ~np.isfinite(b)] = 0.0
    return logp, logb, keep, disc


def write_arpa(
    c: NGramCounts, path: str | Path, logp: list[FloatArray], logb: list[FloatArray], keep: list[npt.NDArray[np.bool_]]
) -> list[int]:
    """Write the kept n-grams as an ARPA file; returns the number written per order."""
    sizes = [int(k.sum()) for k in keep]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write("\\data\\\n")
        for k, s in enumerate(sizes, 1):
            f.write(f"ngram {k}={s}\n")
        texts: list[str] = []
        for k in range(1, c.order + 1):
            # Texts of all n-grams of this order (a kept n-gram's prefix is kept, but building all
            # is one comprehension, simpler than remapping indices to the kept ones).
            texts = list(c.vocab) if k == 1 else _extend_texts(texts, c.vocab, c.prefix[k - 1], c.word[k - 1])
            f.write(f"\n\\{k}-grams:\n")
            idx = np.flatnonzero(keep[k - 1]).tolist()
            ps = logp[k - 1].tolist()
            bs = logb[k - 1].tolist()
            lines = []
            for i in idx:
                b = bs[i]
                p = ps[i]
                ptxt = "-99" if p == BOS_LOGPROB else _fmt(p)
                lines.append(f"{ptxt}\t{texts[i]}\t{_fmt(b)}\n" if b != 0.0 else f"{ptxt}\t{texts[i]}\n")
            f.writelines(lines)
        f.write("\n\\end\\\n")
    return sizes


def build_arpa(
    sentences: Iterable[Sequence[str]],
    order: int,
    path: str | Path,
    prune: list[int] | None = None,
    discount_fallback: Sequence[float] | None = DISCOUNT_FALLBACK,
) -> dict[str, Any]:
    """Estimate an interpolated modified Kneser-Ney model of ``order`` and write it to ``path``.

    ``sentences``: words (or token symbols) per sentence, without ``<s>``/``</s>``. ``prune[k]``:
    drop n-grams of order k+1 whose count is at most that (``prune[0]`` must be 0; the last value
    applies to higher orders). Returns statistics: n-grams written per order (``counts``), before
    pruning (``counts_unpruned``), the discounts, vocabulary size (with ``<unk>``, ``<s>``,
    ``</s>``), sentences, tokens (``</s>`` included), the file's size in bytes and the seconds taken,
    and which orders fell back to ``discount_fallback``.
    """
    t0 = time.perf_counter()
    c = count_ngrams(sentences, order)
    t1 = time.perf_counter()
    logp, logb, keep, disc = estimate(c, prune, discount_fallback)
    t2 = time.perf_counter()
    sizes = write_arpa(c, path, logp, logb, keep)
    t3 = time.perf_counter()
    return {
        "order": order,
        "counts": sizes,
        "counts_unpruned": [len(r) for r in c.raw],
        "discounts": [list(d) for d in disc],
        # Orders whose discounts are the fallback (a small vocabulary, e.g. 128 tokens, has no
        # unigram seen after only 1-3 distinct tokens): where lmplz needs --discount_fallback.
        "discount_fallback_orders": [k for k in range(1, order + 1) if _estimated_discounts(c.adjusted[k - 1]) is None],
        "vocab_size": len(c.vocab),
        "sentences": c.sentences,
        "tokens": c.tokens,
        "bytes": Path(path).stat().st_size,
        "seconds": {"count": round(t1 - t0, 2), "estimate": round(t2 - t1, 2), "write": round(t3 - t2, 2)},
    }


def tokenize_for_lm(sentences: Iterable[str], spm_path: str | Path) -> list[list[str]]:
    """SentencePiece-encode each sentence and write token id i as the symbol ``chr(i + 100)``.

    This is how NeMo builds token-level n-gram models for BPE ASR models (its
    ``train_kenlm.py``) and how ``NGramGPULanguageModel.from_arpa`` maps ARPA symbols back to
    token ids, so the model scores exactly the tokens the acoustic model emits.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    symbols = [chr(i + TOKEN_OFFSET) for i in range(sp.get_piece_size())]
    encoded: list[list[int]] = sp.encode(list(sentences))
    return [[symbols[i] for i in ids] for ids in encoded]


def read_sentences(paths: Iterable[str | Path]) -> list[str]:
    """Non-empty lines of text files, one sentence per line, stripped."""
    out: list[str] = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            out.extend(s for line in f if (s := line.strip()))
    return out


def arpa_perplexity(path: str | Path, sentences: Iterable[Sequence[str]]) -> dict[str, float]:
    """Perplexity of ``sentences`` under an ARPA model with standard backoff queries.

    Every word and each ``</s>`` count; a word the model lacks is scored as ``<unk>`` (KenLM's
    "including OOVs"). Loads the whole file into a dict: for evaluation, not for decoding.
    """
    probs: dict[str, tuple[float, float]] = {}
    order = 0
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("\\") and line.endswith("-grams:"):
                order = int(line[1:].split("-")[0])
                continue
            if order == 0 or not line or line.startswith("\\"):
                continue
            parts = line.split("\t")
            probs[parts[1]] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)
    total = 0.0
    count = oov = 0
    for sent in sentences:
        words = [w if w in probs else UNK for w in sent] + [EOS]
        oov += sum(w == UNK for w in words)
        hist = [BOS]
        for w in words:
            ctx = hist[-(order - 1) :] if order > 1 else []
            backoff = 0.0
            while True:
                key = " ".join([*ctx, w])
                if key in probs:
                    total += backoff + probs[key][0]
                    break
                backoff += probs.get(" ".join(ctx), (0.0, 0.0))[1]
                ctx = ctx[1:]
            count += 1
            hist.append(w)
    return {"perplexity": 10 ** (-total / count), "log10_prob": total, "tokens": count, "oov": oov}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--text", action="append", required=True, help="training text, one sentence a line (repeatable)")
    ap.add_argument("--order", type=int, default=4)
    ap.add_argument("--spm", help="SentencePiece model: build a token-level model (symbols chr(id + 100))")
    ap.add_argument("--prune", type=int, nargs="+", help="count thresholds per order, e.g. 0 0 1 1")
    ap.add_argument("--out", required=True, help="ARPA file to write")
    ap.add_argument("--eval", action="append", default=[], help="text whose perplexity to print (repeatable)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    lines = read_sentences(args.text)

    def prepare(texts: list[str]) -> list[list[str]]:
        return tokenize_for_lm(texts, args.spm) if args.spm else [s.split() for s in texts]

    sents = prepare(lines)
    t1 = time.perf_counter()
    stats = build_arpa(sents, args.order, args.out, prune=args.prune)
    stats["seconds"] = {"read": round(t1 - t0, 2), **stats["seconds"], "total": round(time.perf_counter() - t0, 2)}
    for e in args.eval:
        stats[f"eval {e}"] = arpa_perplexity(args.out, prepare(read_sentences([e])))
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
