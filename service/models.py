"""Model packages on disk -> loaded recognizers.

A package is ``<model_dir>/<name>/{model.onnx, model.json}`` plus ``<tokens_dir>/<name>.txt``
(and ``<name>.model`` for SentencePiece models), as written by ``export_to_onnx.py``.
A ``Recognizer`` ties together the package's features, engine and decoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.decoding import Detokenizer, FramePath, Subsampling, Word, ctc_align, read_token_map
from service.engine import Device, Engine
from service.features import FeatureConfig, FeatureExtractor, NormStats

SUPPORTED_FORMAT_VERSION = 1


class PackageError(Exception):
    """A model package is missing, incomplete or inconsistent (an operator's problem)."""


def list_packages(model_dir: Path) -> list[str]:
    """Names of the packages in ``model_dir`` (directories holding a model.json)."""
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if (p / "model.json").is_file())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (model.json records it for model.onnx)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    name: str
    meta: dict[str, Any]
    onnx_path: Path
    tokens_path: Path
    spm_path: Path | None

    @classmethod
    def open(cls, model_dir: Path, tokens_dir: Path, name: str) -> ModelPackage:
        pkg_dir = model_dir / name
        meta_path = pkg_dir / "model.json"
        if not meta_path.is_file():
            have = ", ".join(list_packages(model_dir)) or "none"
            raise PackageError(f"no model package '{name}' in {model_dir} (packages found: {have})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PackageError(f"{meta_path}: unreadable: {e}") from e
        if meta.get("format_version") != SUPPORTED_FORMAT_VERSION:
            raise PackageError(
                f"{meta_path}: format_version {meta.get('format_version')!r} is not supported "
                f"(expected {SUPPORTED_FORMAT_VERSION}); re-export with this version's export_to_onnx.py"
            )
        onnx_path = pkg_dir / meta["onnx"]["file"]
        vocab = meta["vocabulary"]
        tokens_path = tokens_dir / vocab["tokens_file"]
        tok = vocab.get("tokenizer", {"type": "char"})
        spm_path = tokens_dir / tok["file"] if tok["type"] == "sentencepiece" else None
        for p in (onnx_path, tokens_path, spm_path):
            if p is not None and not p.is_file():
                raise PackageError(f"model package '{name}' is incomplete: {p} is missing")
        expected = meta["onnx"].get("sha256")
        if expected and sha256_file(onnx_path) != expected:
            raise PackageError(f"{onnx_path}: checksum differs from model.json (corrupt or replaced file)")
        return cls(name=name, meta=meta, onnx_path=onnx_path, tokens_path=tokens_path, spm_path=spm_path)

    def summary(self) -> dict[str, Any]:
        m = self.meta
        return {
            "name": self.name,
            "language": m.get("language"),
            "model_class": m.get("model_class"),
            "parameters": m.get("parameters"),
            "sample_rate": m["features"]["sample_rate"],
            "vocab_size": m["vocabulary"]["size"],
            "subsampling_factor": m["encoder"]["subsampling"]["factor"],
            "frame_shift_s": m["encoder"]["frame_shift_s"],
            "max_audio_s": m["encoder"].get("max_audio_s"),
            "nemo_version": m.get("nemo_version"),
            "onnx_sha256": m["onnx"].get("sha256"),
        }


@dataclass(frozen=True)
class Transcript:
    text: str
    token_ids: list[int]
    words: list[Word]


class Recognizer:
    """Features -> ONNX Runtime -> greedy CTC for one model package. Thread-safe."""

    def __init__(
        self, package: ModelPackage, device: Device = "cpu", intra_op_threads: int = 1, inter_op_threads: int = 1
    ):
        self.package = package
        meta = package.meta
        try:
            self.features = FeatureExtractor(FeatureConfig.from_dict(meta["features"]))
            self.subsampling = Subsampling.from_dict(meta["encoder"]["subsampling"])
            pieces = read_token_map(package.tokens_path)
        except (KeyError, ValueError) as e:
            raise PackageError(f"model package '{package.name}': {e}") from e
        vocab = meta["vocabulary"]
        # Token map: V pieces then "<blk> V"; the graph outputs V + 1 classes.
        if len(pieces) != vocab["size"] + 1 or vocab["blank_id"] != vocab["size"]:
            raise PackageError(
                f"model package '{package.name}': token map has {len(pieces)} entries, "
                f"model.json says {vocab['size']} tokens + blank"
            )
        self.blank_id = int(vocab["blank_id"])
        self.detokenize = Detokenizer(pieces[:-1], package.spm_path, vocab.get("supported_punctuation", []))
        self.engine = Engine(package.onnx_path, device, intra_op_threads, inter_op_threads)
        self.sample_rate = int(meta["features"]["sample_rate"])
        self.max_audio_s = float(meta["encoder"].get("max_audio_s") or float("inf"))
        self.frame_shift_s = float(meta["encoder"]["frame_shift_s"])
        # Input samples per encoder frame (feature hop x subsampling factor).
        self.frame_samples = self.features.cfg.hop_length * self.subsampling.factor
        self.name = package.name

    def logprobs(
        self, audios: list[npt.NDArray[np.float32]], stats: list[NormStats | None] | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Log-probabilities [B, T', V+1] and valid encoder lengths [B] for a batch of signals."""
        feats, lengths = self.features.batch(audios, stats)
        return self.engine.run(feats, lengths), self.subsampling.encoded_lengths(lengths)

    def paths(
        self, audios: list[npt.NDArray[np.float32]], stats: list[NormStats | None] | None = None
    ) -> list[FramePath]:
        """Best label and its log-probability per encoder frame, for each signal of a batch."""
        if not audios:
            return []
        lp, enc_len = self.logprobs(audios, stats)
        return [FramePath.from_logprobs(lp[i], int(enc_len[i])) for i in range(len(audios))]

    def decode(self, path: FramePath) -> Transcript:
        """Text, token ids and timed words of one best path."""
        align = ctc_align(path, self.blank_id)
        return Transcript(
            text=self.detokenize(align.ids),
            token_ids=align.ids,
            words=self.detokenize.words(align, self.frame_shift_s),
        )

    def transcribe(self, audios: list[npt.NDArray[np.float32]]) -> list[Transcript]:
        """Transcribe mono float32 signals at ``sample_rate``; one result per input, in order."""
        return [self.decode(p) for p in self.paths(audios)]
