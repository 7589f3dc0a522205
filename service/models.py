"""Model packages on disk -> loaded recognizers.

A package is ``<model_dir>/<name>/{model.onnx, model.json}`` plus ``<tokens_dir>/<name>.txt``
(and ``<name>.model`` for SentencePiece models), as written by ``export_to_onnx.py``.
A ``Recognizer`` ties together the package's features, engine and decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.decoders import DecodeRequest, DecoderFactory, PathDecoder
from service.decoding import SEGMENT_PAUSE_S, Detokenizer, FramePath, Word, ctc_align, read_token_map
from service.engine import Device, Engine
from service.features import FeatureExtractor, NormStats
from service.package import MANIFEST_FILE, Manifest, PackageError, list_packages, sha256_file


@dataclass(frozen=True)
class ModelPackage:
    """A package's files on disk, checked: its manifest, graph, token map and tokenizer."""

    name: str
    manifest: Manifest
    onnx_path: Path
    tokens_path: Path
    spm_path: Path | None

    @classmethod
    def open(cls, model_dir: Path, tokens_dir: Path, name: str) -> ModelPackage:
        pkg_dir = model_dir / name
        if not (pkg_dir / MANIFEST_FILE).is_file():
            have = ", ".join(list_packages(model_dir)) or "none"
            raise PackageError(f"no model package '{name}' in {model_dir} (packages found: {have})")
        m = Manifest.read(pkg_dir)
        onnx_path = pkg_dir / m.onnx.file
        tokens_path = tokens_dir / m.vocabulary.tokens_file
        tok = m.vocabulary.tokenizer
        spm_path = tokens_dir / tok.file if tok.type == "sentencepiece" and tok.file else None
        if tok.type == "sentencepiece" and spm_path is None:
            raise PackageError(f"model package '{name}': a sentencepiece tokenizer without its file")
        for p in (onnx_path, tokens_path, spm_path):
            if p is not None and not p.is_file():
                raise PackageError(f"model package '{name}' is incomplete: {p} is missing")
        if m.onnx.sha256 and sha256_file(onnx_path) != m.onnx.sha256:
            raise PackageError(f"{onnx_path}: checksum differs from model.json (corrupt or replaced file)")
        if (ext := m.onnx.external_data) is not None:
            # 1.8 GB/s here: 1.3 s for a 0.6B-parameter float32 model, a price worth paying at start
            # against serving from a truncated or swapped weights file.
            data_path = pkg_dir / ext.file
            if not data_path.is_file():
                raise PackageError(f"model package '{name}' is incomplete: {data_path} is missing")
            if data_path.stat().st_size != ext.bytes or sha256_file(data_path) != ext.sha256:
                raise PackageError(f"{data_path}: size or checksum differs from model.json (corrupt or replaced file)")
        return cls(name=name, manifest=m, onnx_path=onnx_path, tokens_path=tokens_path, spm_path=spm_path)

    def summary(self) -> dict[str, Any]:
        return {**self.manifest.summary(), "name": self.name}


@dataclass(frozen=True)
class Utterance:
    """The best path of one stretch of speech, and where it starts in the recording (encoder frames)."""

    offset: int
    path: FramePath


@dataclass(frozen=True)
class Transcript:
    text: str
    token_ids: list[int]
    words: list[Word]


class Recognizer:
    """Features -> ONNX Runtime -> greedy CTC for one model package. Thread-safe."""

    def __init__(
        self,
        package: ModelPackage,
        device: Device = "cpu",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        cpu_mem_arena: bool = True,
    ):
        self.package = package
        m = package.manifest
        self.features = FeatureExtractor(m.features)
        self.subsampling = m.encoder.subsampling
        try:
            pieces = read_token_map(package.tokens_path)
        except ValueError as e:
            raise PackageError(f"model package '{package.name}': {e}") from e
        vocab = m.vocabulary
        # Token map: V pieces then "<blk> V"; the graph outputs V + 1 classes.
        if len(pieces) != vocab.size + 1 or vocab.blank_id != vocab.size:
            raise PackageError(
                f"model package '{package.name}': token map has {len(pieces)} entries, "
                f"model.json says {vocab.size} tokens + blank"
            )
        self.blank_id = vocab.blank_id
        self.detokenize = Detokenizer(pieces[:-1], package.spm_path, vocab.supported_punctuation)
        self.decoders = DecoderFactory(
            package.name, package.onnx_path.parent, m.decoding, pieces[:-1], self.detokenize.processor
        )
        self.engine = Engine(package.onnx_path, device, intra_op_threads, inter_op_threads, cpu_mem_arena)
        self.sample_rate = m.features.sample_rate
        self.max_audio_s = m.encoder.max_audio_s or float("inf")
        self.suited_max_s = m.encoder.suited_max_s or float("inf")
        self.frame_shift_s = m.encoder.frame_shift_s
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
        self,
        audios: list[npt.NDArray[np.float32]],
        stats: list[NormStats | None] | None = None,
        decoders: list[PathDecoder | None] | None = None,
    ) -> list[FramePath]:
        """Best label and its log-probability per encoder frame, for each signal of a batch.

        Each signal's decoder (``DecoderFactory.resolve``; None: greedy) picks its path from its
        log-probs here, on the inference thread, so no caller keeps a [T, V] matrix.
        """
        if not audios:
            return []
        lp, enc_len = self.logprobs(audios, stats)
        out = []
        for i in range(len(audios)):
            dec = decoders[i] if decoders else None
            n = int(enc_len[i])
            out.append(FramePath.from_logprobs(lp[i], n) if dec is None else dec(lp[i, :n]))
        return out

    def decode(self, path: FramePath) -> Transcript:
        """Text, token ids and timed words of one best path."""
        align = ctc_align(path, self.blank_id)
        return Transcript(
            text=self.detokenize(align.ids),
            token_ids=align.ids,
            words=self.detokenize.words(align, self.frame_shift_s),
        )

    def decode_utterances(self, utterances: Sequence[Utterance]) -> Transcript:
        """One transcript of a recording's utterances, in the recording's own time.

        Each utterance is decoded on its own (it was heard on its own); its words move by its
        offset, and its first word starts a new caption segment (a pause the speaker made).
        """
        texts: list[str] = []
        ids: list[int] = []
        words: list[Word] = []
        for u in utterances:
            t = self.decode(u.path)
            if not t.text.strip():
                continue
            texts.append(t.text)
            ids += t.token_ids
            shift = u.offset * self.frame_shift_s
            for i, w in enumerate(t.words):
                words.append(
                    replace(
                        w,
                        start=w.start + shift,
                        end=w.end + shift,
                        start_frame=w.start_frame + u.offset,
                        end_frame=w.end_frame + u.offset,
                        speech_start=w.speech_start + shift,
                        pause_before=max(w.pause_before, SEGMENT_PAUSE_S) if i == 0 and words else w.pause_before,
                    )
                )
        return Transcript(text=" ".join(texts), token_ids=ids, words=words)

    def transcribe(
        self, audios: list[npt.NDArray[np.float32]], decode: DecodeRequest | None = None
    ) -> list[Transcript]:
        """Transcribe mono float32 signals at ``sample_rate``; one result per input, in order.

        Decoded as the server decodes a request with ``decode`` (default: the package's own way).
        """
        decoder = self.decoders.resolve(decode or DecodeRequest())
        return [self.decode(p) for p in self.paths(audios, None, [decoder] * len(audios))]
