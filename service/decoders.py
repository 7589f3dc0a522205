"""Which decoder a request gets: greedy CTC, or beam search with the package's LM and hotwords.

A package says how it decodes by default (``model.json`` ``decoding``: greedy when absent); a
request may ask otherwise (``DecodeRequest``: the native form fields ``decoding``, ``beam_size``,
``lm_weight``, ``word_bonus``, ``hotwords``; the OpenAI route's ``prompt`` words as hotwords).
``DecoderFactory.resolve`` checks the request against the model (a hotword the vocabulary cannot
spell, an LM weight for a model without an LM: ``400`` naming it) and returns the decoder to run
on the inference thread after the acoustic model: ``None`` for greedy (``FramePath.from_logprobs``,
NeMo's ``GreedyCTCInfer``), else a ``service.beam.BeamSearch``. Either way the result is a best
path per frame, so words, timings and confidences are computed from it the same way.

Limits (``Settings``: ``ASR_BEAM_MAX_SIZE``, ``ASR_HOTWORDS_MAX``, ``ASR_HOTWORD_MAX_CHARS``)
bound what one request can make the server do; the search's cost grows with the beam, and
a boosting tree's size with the hotwords (trees are cached per hotword list, LRU).
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from service.beam import BeamSearch, Fusion
from service.decoding import SPACE_PIECE, FramePath
from service.errors import ClientError
from service.lm import BoostingTree, LMError, NGramLM
from service.package import DecodingSection, PackageError, sha256_file

Method = Literal["greedy", "beam"]
PathDecoder = Callable[[npt.NDArray[np.float32]], FramePath]
MAX_BOOST = 100.0
_TREE_CACHE = 64  # boosting trees kept per model (one per distinct hotword list)
_PROMPT_WORD = re.compile(r"[^\W_](?:[\w'-]*[^\W_])?")


@dataclass(frozen=True)
class Hotword:
    phrase: str
    boost: float | None = None  # the phrase's own score per token; None: the package's hotword_score


@dataclass(frozen=True)
class DecodeLimits:
    beam_max: int = 32
    hotwords_max: int = 200
    hotword_max_chars: int = 64


@dataclass(frozen=True)
class DecodeRequest:
    """What a request asked for; None: the package's default."""

    method: Method | None = None
    beam_size: int | None = None
    lm_weight: float | None = None
    word_bonus: float | None = None
    hotwords: tuple[Hotword, ...] = ()
    strict: bool = True  # False (OpenAI prompt words): drop hotwords the model cannot spell, no 400

    @classmethod
    def from_form(
        cls,
        limits: DecodeLimits,
        decoding: str | None = None,
        beam_size: int | None = None,
        lm_weight: float | None = None,
        word_bonus: float | None = None,
        hotwords: str | None = None,
    ) -> DecodeRequest:
        """The native route's form fields, checked (``400`` naming the field)."""
        if decoding not in (None, "", "greedy", "beam"):
            raise ClientError(400, "invalid_decoding", f"decoding must be greedy or beam, got {decoding!r}", "decoding")
        if beam_size is not None and not 1 <= beam_size <= limits.beam_max:
            raise ClientError(
                400, "invalid_beam_size", f"beam_size must be 1 to {limits.beam_max}, got {beam_size}", "beam_size"
            )
        if lm_weight is not None and not (math.isfinite(lm_weight) and 0 <= lm_weight <= 10):
            raise ClientError(400, "invalid_lm_weight", f"lm_weight must be 0 to 10, got {lm_weight}", "lm_weight")
        if word_bonus is not None and not (math.isfinite(word_bonus) and -20 <= word_bonus <= 20):
            raise ClientError(
                400, "invalid_word_bonus", f"word_bonus must be -20 to 20, got {word_bonus}", "word_bonus"
            )
        words = parse_hotwords(hotwords, limits)
        method: Method | None = decoding or None  # type: ignore[assignment]
        if method == "greedy" and (words or beam_size is not None or lm_weight is not None or word_bonus is not None):
            field = "hotwords" if words else "beam_size" if beam_size is not None else "lm_weight"
            raise ClientError(
                400, "invalid_decoding", f"{field} needs decoding=beam (greedy decoding takes no options)", field
            )
        return cls(method, beam_size, lm_weight, word_bonus, words)

    @classmethod
    def from_prompt(cls, prompt: str | None, limits: DecodeLimits) -> DecodeRequest:
        """OpenAI's ``prompt``: its words become hotwords (what OpenAI users send to steer spelling).

        Only the words count (a CTC model has no prompt to continue); the first
        ``hotwords_max`` distinct ones are used, and words the model cannot spell are dropped.
        """
        if not prompt or not prompt.strip():
            return cls()
        seen: dict[str, None] = {}
        for w in _PROMPT_WORD.findall(prompt):
            if len(w) <= limits.hotword_max_chars:
                seen.setdefault(w, None)
        words = tuple(Hotword(w) for w in list(seen)[: limits.hotwords_max])
        return cls(hotwords=words, strict=False)


def parse_hotwords(text: str | None, limits: DecodeLimits) -> tuple[Hotword, ...]:
    """``"phrase[:boost], phrase[:boost]"`` (commas or new lines between phrases)."""
    if text is None or not text.strip():
        return ()
    out: list[Hotword] = []
    for raw in re.split(r"[,\n]", text):
        item = raw.strip()
        if not item:
            continue
        phrase, boost = item, None
        if ":" in item:
            phrase, _, b = item.rpartition(":")
            phrase = phrase.strip()
            try:
                boost = float(b)
            except ValueError:
                raise ClientError(
                    400, "invalid_hotwords", f"hotword {item!r}: the boost after ':' must be a number", "hotwords"
                ) from None
            if not (math.isfinite(boost) and 0 < boost <= MAX_BOOST):
                raise ClientError(
                    400, "invalid_hotwords", f"hotword {phrase!r}: boost must be in (0, {MAX_BOOST:g}]", "hotwords"
                )
        if not phrase:
            raise ClientError(400, "invalid_hotwords", f"hotword {item!r} has no phrase", "hotwords")
        if len(phrase) > limits.hotword_max_chars:
            raise ClientError(
                400,
                "invalid_hotwords",
                f"hotword {phrase[:20]!r}... is {len(phrase)} characters; at most {limits.hotword_max_chars}",
                "hotwords",
            )
        out.append(Hotword(phrase, boost))
    if len(out) > limits.hotwords_max:
        raise ClientError(400, "too_many_hotwords", f"{len(out)} hotwords; at most {limits.hotwords_max}", "hotwords")
    return tuple(out)


class DecoderFactory:
    """One model's decoders: its defaults, its LM (loaded once), its boosting trees (cached)."""

    def __init__(
        self,
        name: str,
        pkg_dir: Path,
        defaults: DecodingSection | None,
        pieces: list[str],
        sp: Any,
    ):
        self.name = name
        self.defaults = defaults or DecodingSection()
        self.vocab_size = len(pieces)
        self.blank_id = len(pieces)
        self._pieces = {p: i for i, p in enumerate(pieces)}
        self._sp = sp  # the Detokenizer's SentencePiece processor (None: a character vocabulary), not a second load
        self._lm: NGramLM | None = None
        self._lm_lock = threading.Lock()
        self._trees: OrderedDict[tuple[Hotword, ...], BoostingTree] = OrderedDict()
        self._trees_lock = threading.Lock()
        self._lm_path = pkg_dir / self.defaults.lm.file if self.defaults.lm else None
        if self._lm_path is not None and not self._lm_path.is_file():
            raise PackageError(f"model package '{name}': its language model {self._lm_path} is missing")
        if self.defaults.method == "beam":
            self.language_model()  # used by every request: load it with the model, not on the first request

    @property
    def has_lm(self) -> bool:
        return self._lm_path is not None

    def language_model(self) -> NGramLM | None:
        if self._lm_path is None:
            return None
        with self._lm_lock:
            if self._lm is None:
                lm_cfg = self.defaults.lm
                assert lm_cfg is not None
                if sha256_file(self._lm_path) != lm_cfg.sha256:
                    raise PackageError(f"{self._lm_path}: checksum differs from model.json (corrupt or replaced)")
                try:
                    self._lm = NGramLM.from_arpa(self._lm_path, self.vocab_size)
                except LMError as e:
                    raise PackageError(f"model package '{self.name}': {e}") from e
            return self._lm

    def describe(self, req: DecodeRequest) -> dict[str, Any]:
        """What a request's decoding was (the native response's ``decoding``)."""
        method = self._method(req)
        if method == "greedy":
            return {"method": "greedy"}
        d = self.defaults
        lm_weight = d.lm_weight if req.lm_weight is None else req.lm_weight
        return {
            "method": "beam",
            "beam_size": req.beam_size or d.beam_size,
            "lm_weight": lm_weight if self.has_lm else 0.0,
            "word_bonus": d.word_bonus if req.word_bonus is None else req.word_bonus,
            "hotwords": len(req.hotwords),
        }

    def _method(self, req: DecodeRequest) -> Method:
        if req.method:
            return req.method
        if (req.hotwords and req.strict) or req.beam_size or req.lm_weight is not None or req.word_bonus is not None:
            return "beam"  # options only beam search has imply it
        return self.defaults.method

    def resolve(self, req: DecodeRequest) -> PathDecoder | None:
        """The decoder for ``req`` on this model (None: greedy); ``ClientError`` if it cannot be."""
        method = self._method(req)
        if method == "greedy":
            return None
        d = self.defaults
        lm_weight = d.lm_weight if req.lm_weight is None else req.lm_weight
        if req.lm_weight and not self.has_lm:
            raise ClientError(
                400, "no_language_model", f"model '{self.name}' has no language model: lm_weight needs one", "lm_weight"
            )
        fusions: list[Fusion] = []
        lm = self.language_model() if lm_weight > 0 else None
        if lm is not None:
            fusions.append(Fusion(lm.automaton, lm_weight, eos=True))
        if req.hotwords:
            tree = self._tree(req)
            if tree is not None:
                fusions.append(Fusion(tree.automaton, d.hotword_weight, eos=False))
        return BeamSearch(
            blank_id=self.blank_id,
            beam_size=req.beam_size or d.beam_size,
            beam_beta=d.word_bonus if req.word_bonus is None else req.word_bonus,
            beam_threshold=d.beam_threshold,
            fusions=tuple(fusions),
        )

    def spell(self, phrase: str) -> list[int] | None:
        """The token ids of a phrase as NeMo's tokenizer writes it (``text_to_ids``); None if the
        vocabulary cannot spell it (an unknown piece or character)."""
        if self._sp is not None:
            ids = [int(i) for i in self._sp.encode(phrase)]
            unk = self._sp.unk_id()
            return ids if ids and unk not in ids else None
        out = []
        for ch in phrase:
            i = self._pieces.get(SPACE_PIECE if ch == " " else ch)
            if i is None:
                return None
            out.append(i)
        return out or None

    def _tree(self, req: DecodeRequest) -> BoostingTree | None:
        key = req.hotwords
        with self._trees_lock:
            hit = self._trees.get(key)
            if hit is not None:
                self._trees.move_to_end(key)
                return hit
        ids, scores = [], []
        for hw in req.hotwords:
            spelled = self.spell(hw.phrase)
            if spelled is None:  # "Kubernetes" for a lower-case vocabulary
                spelled = self.spell(hw.phrase.lower())
            if spelled is None:
                if req.strict:
                    raise ClientError(
                        400,
                        "invalid_hotwords",
                        f"hotword {hw.phrase!r}: model '{self.name}' cannot spell it (outside its vocabulary)",
                        "hotwords",
                    )
                continue
            ids.append(spelled)
            scores.append(hw.boost if hw.boost is not None else 0.0)  # 0.0: the tree's context score
        if not ids:
            return None
        d = self.defaults
        tree = BoostingTree.from_phrases(
            ids, scores, self.vocab_size, context_score=d.hotword_score, depth_scaling=d.hotword_depth_scaling
        )
        with self._trees_lock:
            self._trees[key] = tree
            while len(self._trees) > _TREE_CACHE:
                self._trees.popitem(last=False)
        return tree
