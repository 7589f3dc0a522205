"""Token-level fusion models for CTC beam search: an n-gram LM (ARPA) and a phrase-boosting tree.

Both are what NeMo 3's ``beam_batch`` strategy fuses into its beam (``NGramGPULanguageModel``
and ``GPUBoostingTreeModel``), and both are the same kind of object: a weighted automaton
over the model's token ids in which every state has arcs for some tokens and a backoff arc
(weight, target) for the rest; the root state has an arc for every token. ``advance(state)``
answers, for the whole vocabulary at once, the score of each next token and the state it
leads to, following backoffs as NeMo's ``_advance_pytorch`` does (float32 accumulation, the
first state on the backoff chain that has the token wins). Answers are cached per state:
a beam revisits the same few states frame after frame, so the search itself is a table lookup.

N-gram LM (``NGramLM.from_arpa``): the ARPA file is token-level as NeMo builds them for BPE
models: each token id ``i`` is written as the character ``chr(i + 100)``; log10 weights become
natural logs; tokens the LM lacks get the ``<unk>`` weight, spread evenly over them
(``normalize_unk``); ``<s>`` is a state of its own that decoding starts from; a state's
end-of-sentence weight is its ``</s>`` weight, resolved through backoffs. States are contexts:
an n-gram below the highest order is a state that backs off to its suffix; a highest-order
n-gram is an arc to its suffix's state (NeMo's ``SuffixTreeStorage``).

Boosting tree (``BoostingTree.from_phrases``): NeMo's ``ContextGraph`` (icefall's
Aho-Corasick trie): a phrase's k-th token (k >= 1) scores ``context_score * depth_scaling +
ln(k + 1)`` (its first token ``context_score``); a state's backoff is its failure link, weighted
``fail.node_score - node.node_score`` so that a hypothesis leaving a half-matched phrase gives
the bonus back (and keeps it once the phrase is complete). Each phrase may carry its own
context score (a per-hotword boost).
"""

from __future__ import annotations

import functools
import gzip
import math
import re
import threading
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

TOKEN_OFFSET = 100  # NeMo's DEFAULT_TOKEN_OFFSET: token id i is the ARPA word chr(i + 100)
NEMO_NEG_INF = -10000.0  # NeMo's "no final weight here" marker (nemo.collections.common.parts.NEG_INF)
_BOS, _EOS, _UNK = -1, -2, -3
_SPECIAL = {"<s>": _BOS, "</s>": _EOS, "<unk>": _UNK}
_LOG10_E = math.log10(math.e)
_CACHE_STATES = 65536  # per automaton: cached advance() answers (~1 KB each for a 128-token vocabulary)


class LMError(ValueError):
    """An LM file that cannot be read, or does not fit the model's vocabulary."""


@dataclass
class Automaton:
    """States with arcs (CSR, sorted by label within a state) and a backoff each; the root is 0."""

    vocab_size: int
    arc_start: npt.NDArray[np.int64]  # [S]
    arc_end: npt.NDArray[np.int64]  # [S]
    arc_label: npt.NDArray[np.int32]  # [A]
    arc_weight: npt.NDArray[np.float32]  # [A]
    arc_to: npt.NDArray[np.int32]  # [A]
    backoff_to: npt.NDArray[np.int32]  # [S]
    backoff_w: npt.NDArray[np.float32]  # [S]
    final: npt.NDArray[np.float32]  # [S], resolved through backoffs
    start_state: int  # where a hypothesis starts (an LM's <s> state; a boosting tree's root)
    _cache: dict[int, tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def num_states(self) -> int:
        return int(self.backoff_to.shape[0])

    @functools.cached_property
    def max_score(self) -> float:
        """An upper bound of any score ``advance`` returns: the best arc after the longest run of
        positive backoffs (the beam search's blank-frame short cut needs it)."""
        hops, cur = 0, np.arange(self.num_states).astype(np.int32)
        while (cur != 0).any():
            cur = self.backoff_to[cur]
            hops += 1
        best_arc = float(self.arc_weight.max()) if self.arc_weight.size else 0.0
        return best_arc + hops * max(0.0, float(self.backoff_w.max()))

    def advance(self, state: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
        """Scores [V] and next states [V] of every token from ``state`` (read-only arrays)."""
        hit = self._cache.get(state)
        if hit is not None:
            return hit
        scores = np.zeros(self.vocab_size, np.float32)
        nxt = np.full(self.vocab_size, -1, np.int32)
        acc = np.float32(0.0)
        cur = state
        while True:
            a, b = int(self.arc_start[cur]), int(self.arc_end[cur])
            if b > a:
                labels = self.arc_label[a:b]
                new = nxt[labels] < 0
                lab = labels[new]
                scores[lab] = acc + self.arc_weight[a:b][new]
                nxt[lab] = self.arc_to[a:b][new]
            if cur == 0:
                break
            acc = np.float32(acc + self.backoff_w[cur])
            cur = int(self.backoff_to[cur])
        scores.flags.writeable = False
        nxt.flags.writeable = False
        with self._lock:
            if len(self._cache) >= _CACHE_STATES:
                self._cache.clear()
            self._cache[state] = (scores, nxt)
        return scores, nxt

    def score_tokens(self, ids: Sequence[int], eos: bool = False) -> float:
        """Total score of a token sequence from the start state (tests, diagnostics)."""
        s, total = self.start_state, 0.0
        for i in ids:
            sc, nx = self.advance(s)
            total += float(sc[i])
            s = int(nx[i])
        return total + (float(self.final[s]) if eos else 0.0)

    @classmethod
    def _from_buffer(cls, vocab_size: int, b: _Builder, start_state: int) -> Automaton:
        n = len(b.backoff_to)
        frm = np.frombuffer(b.arc_from, np.int32)
        label = np.frombuffer(b.arc_label, np.int32)
        order = np.lexsort((label, frm))
        frm = frm[order]
        states = np.arange(n)
        return cls(
            vocab_size=vocab_size,
            arc_start=np.searchsorted(frm, states, side="left").astype(np.int64),
            arc_end=np.searchsorted(frm, states, side="right").astype(np.int64),
            arc_label=label[order],
            arc_weight=np.frombuffer(b.arc_weight, np.float64)[order].astype(np.float32),
            arc_to=np.frombuffer(b.arc_to, np.int32)[order],
            backoff_to=np.frombuffer(b.backoff_to, np.int32).copy(),
            backoff_w=np.frombuffer(b.backoff_w, np.float64).astype(np.float32),
            final=np.frombuffer(b.final, np.float64).astype(np.float32),
            start_state=start_state,
        )


class _Builder:
    """Arcs and states as they are read, in typed buffers (16 bytes an arc, not a tuple of objects:
    reading a large ARPA must not cost many times its size in memory)."""

    def __init__(self) -> None:
        self.arc_from, self.arc_label, self.arc_to = array("i"), array("i"), array("i")
        self.arc_weight = array("d")
        self.backoff_to, self.backoff_w, self.final = array("i"), array("d"), array("d")

    def arc(self, frm: int, label: int, to: int, weight: float) -> None:
        self.arc_from.append(frm)
        self.arc_label.append(label)
        self.arc_to.append(to)
        self.arc_weight.append(weight)

    def state(self, backoff_to: int, backoff_w: float, final: float) -> int:
        self.backoff_to.append(backoff_to)
        self.backoff_w.append(backoff_w)
        self.final.append(final)
        return len(self.backoff_to) - 1


# -- n-gram LM ------------------------------------------------------------------------------------


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


_SYMBOL = re.compile(r"(<s>|</s>|<unk>|.)\s?")


def _arpa_ngrams(f: IO[str]) -> Iterator[tuple[int, tuple[int, ...], float, float]]:
    """(order, symbols, ln weight, ln backoff) per n-gram line, symbols as token ids or specials."""
    order = 0
    for raw in f:
        line = raw.rstrip("\n")
        if not line:
            continue
        if line.startswith("\\end\\"):
            return
        if line.startswith("\\"):
            m = re.match(r"\\(\d+)-grams:", line)
            if m:
                order = int(m.group(1))
            continue
        if order == 0:
            continue  # the \data\ header
        parts = line.split("\t")
        if len(parts) < 2:
            raise LMError(f"ARPA line is not 'logprob<TAB>tokens[<TAB>backoff]': {line[:80]!r}")
        w = float(parts[0]) / _LOG10_E
        bo = float(parts[2]) / _LOG10_E if len(parts) > 2 else 0.0
        syms = tuple(_SPECIAL[s] if s in _SPECIAL else ord(s) - TOKEN_OFFSET for s in _SYMBOL.findall(parts[1]))
        if len(syms) != order:
            raise LMError(f"ARPA {order}-gram with {len(syms)} tokens: {line[:80]!r}")
        yield order, syms, w, bo


class NGramLM:
    """A token-level n-gram LM in NeMo's form (see the module docstring)."""

    def __init__(self, automaton: Automaton, max_order: int, path: Path | None = None):
        self.automaton = automaton
        self.max_order = max_order
        self.path = path

    @classmethod
    def from_arpa(cls, path: Path, vocab_size: int, normalize_unk: bool = True) -> NGramLM:
        """Read an ARPA file (``.gz`` too), as NeMo's ``NGramGPULanguageModel.from_arpa`` does."""
        with _open_text(path) as f:
            first = f.readline().strip()
            if first != "\\data\\":
                raise LMError(f"{path}: not an ARPA file (first line {first[:40]!r})")
            max_order = 0
            for line in f:
                m = re.match(r"ngram\s+(\d+)\s*=", line.strip())
                if not m:
                    break
                max_order = max(max_order, int(m.group(1)))
            if max_order < 1:
                raise LMError(f"{path}: ARPA header lists no n-gram counts")
            try:
                return cls._build(_arpa_ngrams(f), max_order, vocab_size, normalize_unk, path)
            except (KeyError, IndexError) as e:
                raise LMError(f"{path}: inconsistent ARPA (an n-gram without its context: {e})") from e

    @classmethod
    def _build(
        cls,
        ngrams: Iterator[tuple[int, tuple[int, ...], float, float]],
        max_order: int,
        vocab_size: int,
        normalize_unk: bool,
        path: Path | None,
    ) -> NGramLM:
        b = _Builder()
        b.state(0, 0.0, NEMO_NEG_INF)  # state 0: the root (empty context)
        b.state(0, 0.0, NEMO_NEG_INF)  # state 1: <s>
        unk, has_bos = -math.inf, False
        unigram_state: dict[int, int] = {}
        lower: dict[tuple[int, ...], int] = {}  # states of the order below the current one
        current: dict[tuple[int, ...], int] = {}
        order_now = 0

        def state_of(ctx: tuple[int, ...]) -> int:
            if len(ctx) == 1:
                return 1 if ctx[0] == _BOS else unigram_state[ctx[0]]
            return lower[ctx]

        for order, syms, w, bo in ngrams:
            if order != order_now:
                if order != order_now + 1 or order > max_order:
                    raise LMError(f"ARPA sections out of order ({order_now} then {order})")
                lower, current, order_now = current, {}, order
            label = syms[-1]
            if order == 1:
                if label == _UNK:
                    unk = w
                elif label == _BOS:
                    has_bos, b.backoff_w[1] = True, bo
                elif label == _EOS:
                    b.final[0] = w
                else:
                    _check_label(label, vocab_size)
                    unigram_state[label] = st = b.state(0, bo, NEMO_NEG_INF)
                    b.arc(0, label, st, w)
                continue
            frm = state_of(syms[:-1])
            if label == _EOS:
                b.final[frm] = w
                continue
            _check_label(label, vocab_size)
            suffix = state_of(syms[1:])
            if order == max_order:  # no longer context: the arc leads to its suffix's state
                b.arc(frm, label, suffix, w)
            else:
                current[syms] = st = b.state(suffix, bo, NEMO_NEG_INF)
                b.arc(frm, label, st, w)
        if not has_bos:
            raise LMError("ARPA has no <s> unigram")
        n_missing = vocab_size - len(unigram_state)
        if normalize_unk and n_missing > 1:
            unk = float(np.float32(unk)) - math.log(n_missing)
        for label in range(vocab_size):
            if label not in unigram_state:
                b.arc(0, label, 0, unk)
        lower, current = {}, {}  # free the context maps before the arrays are built
        auto = Automaton._from_buffer(vocab_size, b, start_state=1)
        _resolve_final(auto)
        return cls(auto, max_order, path)


def _check_label(label: int, vocab_size: int) -> None:
    if not 0 <= label < vocab_size:
        raise LMError(
            f"ARPA token id {label} is outside the model's vocabulary of {vocab_size} "
            f"(a token-level LM writes token i as chr(i + {TOKEN_OFFSET}))"
        )


def _resolve_final(auto: Automaton) -> None:
    """A state's </s> weight through its backoffs (NeMo's ``_get_final_pytorch``), in float32."""
    out = auto.final.copy()
    cur = np.arange(auto.num_states).astype(np.int32)
    acc = np.zeros(auto.num_states, np.float32)
    while (out <= NEMO_NEG_INF).any() and (cur != 0).any():
        acc += auto.backoff_w[cur]
        cur = auto.backoff_to[cur]
        cur_final = auto.final[cur]
        out = np.where((out > NEMO_NEG_INF) | (cur_final <= NEMO_NEG_INF), out, acc + cur_final)
    auto.final = out.astype(np.float32)


# -- phrase boosting ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """A trie node of NeMo's ``ContextGraph`` (the fields its boosting tree reads)."""

    id: int
    token: int
    token_score: float
    node_score: float
    is_end: bool
    level: int
    next: dict[int, _Node] = field(default_factory=dict)
    fail: _Node | None = None


class BoostingTree:
    """Phrase boosting as NeMo's ``GPUBoostingTreeModel`` (see the module docstring)."""

    def __init__(self, automaton: Automaton, phrases: int):
        self.automaton = automaton
        self.phrases = phrases

    @classmethod
    def from_phrases(
        cls,
        token_ids: Sequence[Sequence[int]],
        scores: Sequence[float],
        vocab_size: int,
        context_score: float = 1.0,
        depth_scaling: float = 2.0,
        unk_score: float = 0.0,
    ) -> BoostingTree:
        """Build the tree of tokenized phrases; a phrase's score 0.0 means ``context_score``.

        The same steps as NeMo's ``ContextGraph.build`` (non-uniform weights) then
        ``BoostingTreeStorage``: shared prefixes keep the larger token score, as NeMo's do.
        """
        root = _Node(0, -1, 0.0, 0.0, False, 0)
        root.fail = root
        count = 0
        for tokens, score in zip(token_ids, scores, strict=True):
            node = root
            cs = context_score if score == 0.0 else score
            for i, tok in enumerate(tokens):
                child = node.next.get(tok)
                last = i == len(tokens) - 1
                if child is None:
                    ts = cs * depth_scaling + float(np.log(i + 1)) if i > 0 else cs
                    count += 1
                    child = _Node(count, tok, ts, node.node_score + ts, last, i + 1)
                    node.next[tok] = child
                else:
                    child.token_score = max(cs, child.token_score)
                    child.node_score = node.node_score + child.token_score
                    child.is_end = last or child.is_end
                node = child
        _fill_fail(root)
        return cls(_tree_automaton(root, vocab_size, unk_score), len(token_ids))


def _fill_fail(root: _Node) -> None:
    """Aho-Corasick failure links, as ``ContextGraph._fill_fail_output`` finds them."""
    queue: deque[_Node] = deque()
    for node in root.next.values():
        node.fail = root
        queue.append(node)
    while queue:
        cur = queue.popleft()
        for tok, node in cur.next.items():
            fail = cur.fail
            assert fail is not None
            if tok in fail.next:
                fail = fail.next[tok]
            else:
                fail = fail.fail
                assert fail is not None
                while tok not in fail.next:
                    fail = fail.fail
                    assert fail is not None
                    if fail.token == -1:
                        break
                if tok in fail.next:
                    fail = fail.next[tok]
            node.fail = fail
            queue.append(node)


def _tree_automaton(root: _Node, vocab_size: int, unk_score: float) -> Automaton:
    """``BoostingTreeStorage``: the root has every token (phrase starts, else ``unk_score``)."""
    b = _Builder()
    b.state(0, 0.0, 0.0)
    state: dict[int, int] = {0: 0}
    queue: deque[_Node] = deque([root])
    while queue:  # breadth first: a failure target (shallower) has its state before it is needed
        cur = queue.popleft()
        for tok, node in sorted(cur.next.items()):
            if not 0 <= tok < vocab_size:
                raise LMError(f"phrase token {tok} outside the vocabulary of {vocab_size}")
            assert node.fail is not None
            backoff = 0.0 if node.is_end else node.fail.node_score - node.node_score
            st = state[node.id] = b.state(state[node.fail.id], backoff, 0.0)
            b.arc(state[cur.id], tok, st, node.token_score)
            queue.append(node)
    for label in range(vocab_size):
        if label not in root.next:
            b.arc(0, label, 0, unk_score)
    return Automaton._from_buffer(vocab_size, b, start_state=0)
