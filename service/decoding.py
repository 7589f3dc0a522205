"""Greedy CTC decoding and detokenization, identical to NeMo's ``GreedyCTCInfer`` + CTC decoding.

argmax per frame (ties go to the lowest index, as torch/numpy argmax do), collapse repeats,
drop blank (id = vocabulary size), then turn the ids into text with the model's tokenizer:
SentencePiece for BPE models, concatenation for character models. Like NeMo, a space before a
punctuation mark the vocabulary holds is removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# Token-map spelling of SentencePiece's word boundary, and of a literal space in character
# vocabularies (a map line is "piece id", so a piece cannot be a bare space).
SPACE_PIECE = "\u2581"


@dataclass(frozen=True)
class Subsampling:
    """How the encoder shortens the time axis (NeMo's ``calc_length`` parameters)."""

    factor: int
    kernel_size: int
    stride: int
    all_paddings: int
    ceil_mode: bool
    repeat_num: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Subsampling:
        return cls(
            factor=int(d["factor"]),
            kernel_size=int(d["kernel_size"]),
            stride=int(d["stride"]),
            all_paddings=int(d["all_paddings"]),
            ceil_mode=bool(d["ceil_mode"]),
            repeat_num=int(d["repeat_num"]),
        )

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
        self._sp: Any = None
        if spm_path is not None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(spm_path))
            if self._sp.get_piece_size() != len(pieces):
                raise ValueError(f"tokenizer has {self._sp.get_piece_size()} pieces, token map has {len(pieces)}")
        self._punct = (
            re.compile(r"(\s)(" + "|".join(re.escape(p) for p in supported_punctuation) + ")")
            if supported_punctuation
            else None
        )

    def __call__(self, ids: list[int]) -> str:
        if self._sp is not None:
            text = str(self._sp.decode_pieces([self._sp.id_to_piece(i) for i in ids]))
        else:
            text = "".join(" " if self.pieces[i] == SPACE_PIECE else self.pieces[i] for i in ids)
        if self._punct is not None:
            text = self._punct.sub(r"\2", text)
        return text


def greedy_ctc(logprobs: npt.NDArray[np.float32], length: int, blank_id: int) -> list[int]:
    """Best path of one utterance: argmax, collapse repeats, drop blanks."""
    best = logprobs[:length].argmax(axis=-1)
    if best.size == 0:
        return []
    keep = np.ones(best.shape[0], dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    keep &= best != blank_id
    return [int(i) for i in best[keep]]
