"""Greedy CTC decoding and detokenization, identical to NeMo's ``GreedyCTCInfer`` + CTC decoding.

argmax per frame (ties go to the lowest index, as torch/numpy argmax do), collapse repeats,
drop blank (id = vocabulary size), then turn the ids into text with the model's tokenizer:
SentencePiece for BPE models, concatenation for character models. Like NeMo, a space before a
punctuation mark the vocabulary holds is removed.

Timings follow NeMo 3's CTC offsets (``CTCDecoding._compute_offsets``, ``get_words_offsets``):
a token is *emitted* at the first frame of its run of argmax frames; its offsets are
``[emission of the previous token, own emission)`` (the first token starts one frame before
its emission); a supported punctuation mark ends where it starts and joins the word before
it; a word spans its first token's start to its last token's end; seconds = frames x the
encoder frame shift. Words start at a SentencePiece piece beginning with U+2581, or after a
space token in character vocabularies. Consecutive words therefore touch; the silence between
them is still known from the blank frames, and segments (pause / sentence based) use it.

Confidence comes from the CTC posteriors along the best path (NeMo's "max_prob" measure
without normalization): a token's confidence is the highest probability its run of frames
gives it, a word's is the lowest of its tokens' (NeMo's default "min" aggregation). Only the
best label and its log-probability per frame are kept (``FramePath``), so long audio needs
8 bytes per encoder frame, whatever the vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import regex
from pydantic import BaseModel, ConfigDict

# Token-map spelling of SentencePiece's word boundary, and of a literal space in character
# vocabularies (a map line is "piece id", so a piece cannot be a bare space).
SPACE_PIECE = "\u2581"


class Subsampling(BaseModel):
    """How the encoder shortens the time axis (NeMo's ``calc_length`` parameters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    factor: int
    kernel_size: int
    stride: int
    all_paddings: int
    ceil_mode: bool
    repeat_num: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Subsampling:
        return cls.model_validate(d)

    def encoded_lengths(self, feat_lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Encoder output frames for each input length: NeMo's float formula in integer form."""
        n = np.asarray(feat_lengths, dtype=np.int64)
        add_pad = self.all_paddings - self.kernel_size
        for _ in range(self.repeat_num):
            q = n + add_pad
            n = (-(-q // self.stride) if self.ceil_mode else q // self.stride) + 1
        return n


def read_token_map(path: Path) -> list[str]:
    """Read a "piece id" per line token map (sherpa-onnx format); return pieces by id, blank last."""
    pieces: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        piece, sep, idx = line.rpartition(" ")
        if not sep or not idx.isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'piece id', got {line!r}")
        pieces[int(idx)] = piece
    if sorted(pieces) != list(range(len(pieces))):
        raise ValueError(f"{path}: token ids are not 0..{len(pieces) - 1}")
    return [pieces[i] for i in range(len(pieces))]


class Detokenizer:
    """Token ids -> text, the way the model's NeMo tokenizer does it."""

    def __init__(self, pieces: list[str], spm_path: Path | None, supported_punctuation: list[str]):
        self.pieces = pieces
        self._sp: Any = None  # also DecoderFactory's, to spell hotwords (``processor``)
        if spm_path is not None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(spm_path))
            if self._sp.get_piece_size() != len(pieces):
                raise ValueError(f"tokenizer has {self._sp.get_piece_size()} pieces, token map has {len(pieces)}")
            # NeMo's rule: a piece starts a word when decoding changes it (a U+2581 prefix, <unk>).
            self._starts_word = [str(self._sp.decode_pieces([p])) != p for p in pieces]
        self._punct = (
            re.compile(r"(\s)(" + "|".join(re.escape(p) for p in supported_punctuation) + ")")
            if supported_punctuation
            else None
        )
        # Per vocabulary id: is it a supported punctuation mark (a mark ends where it starts and
        # joins the word before it)?
        marks = set(supported_punctuation)
        self._is_punct = [bool(t) and t in marks for t in (self([i]).strip() for i in range(len(pieces)))]

    @property
    def processor(self) -> Any:
        """The SentencePiece processor (None for a character vocabulary)."""
        return self._sp

    def words(self, align: Alignment, frame_shift_s: float) -> list[Word]:
        """Group an alignment's tokens into timed words, as NeMo's ``get_words_offsets`` does."""
        n = len(align.ids)
        # NeMo's token offsets: [previous emission, own emission); the first starts a frame early.
        starts = [max(0, align.emitted[0] - 1), *align.emitted[:-1]] if n else []
        ends = list(align.emitted)
        is_space = [self._sp is None and self.pieces[i] == SPACE_PIECE for i in align.ids]
        punct = [self._is_punct[i] for i in align.ids]
        for k in range(1, n):
            if punct[k]:
                ends[k] = starts[k]
        groups: list[list[int]] = []  # token indices per word
        open_word = False  # char vocabularies: a token after a space starts a word
        for k, tid in enumerate(align.ids):
            if is_space[k]:
                open_word = False
                continue
            if punct[k] and groups:
                groups[-1].append(k)  # punctuation joins the word before it
            elif not groups or (self._starts_word[tid] if self._sp is not None else not open_word):
                groups.append([k])
            else:
                groups[-1].append(k)
            open_word = True
        words = []
        prev_run_end: int | None = None
        for g in groups:
            text = self([align.ids[k] for k in g]).strip()
            first, last = g[0], g[-1]
            if text:
                s, e = starts[first], ends[last]
                pause = 0.0 if prev_run_end is None else max(0, align.emitted[first] - prev_run_end) * frame_shift_s
                words.append(
                    Word(
                        word=text,
                        start=round(s * frame_shift_s, 3),
                        end=round(e * frame_shift_s, 3),
                        confidence=round(min(align.confidences[k] for k in g), 4),
                        start_frame=s,
                        end_frame=e,
                        speech_start=round(max(0, align.emitted[first] - 1) * frame_shift_s, 3),
                        pause_before=round(pause, 3),
                    )
                )
            prev_run_end = align.run_ends[last]
        return words

    def __call__(self, ids: list[int]) -> str:
        if self._sp is not None:
            text = str(self._sp.decode_pieces([self._sp.id_to_piece(i) for i in ids]))
        else:
            text = "".join(" " if self.pieces[i] == SPACE_PIECE else self.pieces[i] for i in ids)
        if self._punct is not None:
            text = self._punct.sub(r"\2", text)
        return text


@dataclass(frozen=True)
class FramePath:
    """The best label per encoder frame and its log-probability: all greedy CTC needs."""

    ids: npt.NDArray[np.int32]
    logprobs: npt.NDArray[np.float32]

    @classmethod
    def from_logprobs(cls, logprobs: npt.NDArray[np.float32], length: int) -> FramePath:
        lp = logprobs[:length]
        best = lp.argmax(axis=-1).astype(np.int32)
        return cls(best, np.take_along_axis(lp, best[:, None].astype(np.intp), axis=-1)[:, 0].astype(np.float32))

    @classmethod
    def concat(cls, parts: list[FramePath]) -> FramePath:
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.float32))
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.logprobs for p in parts]))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def slice(self, start: int, end: int) -> FramePath:
        return FramePath(self.ids[start:end], self.logprobs[start:end])


@dataclass(frozen=True)
class Alignment:
    """Emitted tokens of a best path: id, emission frame, end of its run of frames, confidence."""

    ids: list[int]
    emitted: list[int]  # first frame of the token's run
    run_ends: list[int]  # one past the last frame of that run
    confidences: list[float]


def ctc_align(path: FramePath, blank_id: int) -> Alignment:
    """Collapse runs of equal labels, drop blank runs; keep each token's run and peak probability."""
    ids = path.ids
    if ids.size == 0:
        return Alignment([], [], [], [])
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [ids.size]])
    labels = ids[starts]
    peaks = np.maximum.reduceat(path.logprobs, starts)
    keep = labels != blank_id
    return Alignment(
        ids=[int(i) for i in labels[keep]],
        emitted=[int(i) for i in starts[keep]],
        run_ends=[int(i) for i in ends[keep]],
        confidences=[float(np.exp(v)) for v in peaks[keep]],
    )


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds
    end: float
    confidence: float
    start_frame: int  # NeMo's start_offset / end_offset, in encoder frames
    end_frame: int
    speech_start: float  # when its first token is emitted, less one frame (used for segment starts)
    pause_before: float  # seconds of blank frames between the previous word's last token and this word


@dataclass(frozen=True)
class Segment:
    text: str
    start: float
    end: float
    words: list[Word]

    @property
    def confidence(self) -> float:
        return min((w.confidence for w in self.words), default=1.0)

    @property
    def avg_logprob(self) -> float:
        """Mean log word confidence (what OpenAI's verbose_json calls avg_logprob)."""
        if not self.words:
            return 0.0
        return float(np.mean([np.log(max(w.confidence, 1e-12)) for w in self.words]))


# Segmenting words for captions and verbose output: a new segment starts after a sentence mark
# the model spells, after a pause, or when the current one reaches caption length limits.
SEGMENT_PAUSE_S = 0.8
SEGMENT_MAX_S = 10.0
SEGMENT_MAX_CHARS = 84  # two caption lines of 42 characters (grapheme clusters: what a reader sees)
_GRAPHEME = regex.compile(r"\X")


def graphemes(text: str) -> list[str]:
    """The characters a reader sees (Unicode extended grapheme clusters, conjuncts included).

    Devanagari writes a syllable as a consonant plus vowel signs and viramas: "नमस्ते" is 6
    code points and 3 characters on screen. Caption lengths count these, not code points.
    """
    return list(_GRAPHEME.findall(text))


SENTENCE_END = (".", "?", "!", "\u0964")  # \u0964: Devanagari danda


def segment_words(words: list[Word]) -> list[Segment]:
    """Group words into segments. A segment starts at its first word's ``speech_start`` (NeMo's
    word start would reach back over the pause before it), and ends with its last word."""
    segments: list[Segment] = []
    cur: list[Word] = []

    def flush() -> None:
        if cur:
            start = max(cur[0].start, cur[0].speech_start)
            segments.append(Segment(" ".join(w.word for w in cur), start, cur[-1].end, list(cur)))
            cur.clear()

    for w in words:
        if cur:
            chars = sum(len(graphemes(x.word)) + 1 for x in cur) + len(graphemes(w.word))
            if (
                cur[-1].word.endswith(SENTENCE_END)
                or w.pause_before >= SEGMENT_PAUSE_S
                or w.end - cur[0].speech_start > SEGMENT_MAX_S
                or chars > SEGMENT_MAX_CHARS
            ):
                flush()
        cur.append(w)
    flush()
    return segments
