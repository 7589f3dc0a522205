"""``model.json``, the contract between the export and the runtime: a typed manifest.

``Manifest`` is the only code that reads or writes a package's ``model.json``: the exporter
builds one from what it read out of the NeMo model and writes it; the runtime, the registry and
training read it back, validated, instead of indexing raw dictionaries. The format version is
declared here once (``FORMAT_VERSION``); a package from another version is refused with a
message that says to re-export it. Unknown keys are refused too: a newer exporter that adds a
field bumps the version, so a typo never passes for a setting.

Files of a package (``export_to_onnx.py`` writes them; ``README.md`` lists them):
``<model_dir>/<name>/model.json``, ``model.onnx`` (``onnx.file``), ``nemo_state.npz``,
and for the peers that load the same graph, ``config.json`` and ``vocab.txt`` (onnx-asr);
``<tokens_dir>/<tokens_file>`` (sherpa-onnx's token map) and the SentencePiece model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.decoding import Subsampling
from service.features import FeatureConfig

FORMAT_VERSION = 1  # also the Literal of Manifest.format_version
MANIFEST_FILE = "model.json"


class PackageError(Exception):
    """A model package is missing, incomplete or inconsistent (an operator's problem)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExternalDataSection(_Section):
    """The weights of a graph past protobuf's 2 GB limit, in one file beside it (ONNX external data).

    ONNX Runtime finds it by the name the graph records, relative to the graph's folder.
    """

    file: str
    sha256: str
    bytes: int


class OnnxSection(_Section):
    file: str = "model.onnx"
    sha256: str | None = None
    external_data: ExternalDataSection | None = Field(None, description="the weights' file, for graphs over 2 GB")
    opset: int = 17
    inputs: list[str] = Field(default_factory=lambda: ["audio_signal", "length"])
    output: str = "logprobs"
    max_abs_diff_vs_nemo: float | None = Field(None, description="the export's own ONNX-vs-NeMo check")
    fp16_weights: int = Field(0, description="weights stored as float16 (exactly their values) behind a Cast")
    precision: Literal["float32", "int8"] = "float32"
    quantization: str | None = Field(None, description="how an int8 graph was quantized")


class EncoderSection(_Section):
    subsampling: Subsampling
    frame_shift_s: float = Field(description="seconds per encoder frame (feature hop x subsampling factor)")
    max_audio_s: float | None = Field(None, description="longest input the graph takes in one piece")
    suited_max_s: float | None = Field(
        None,
        description="longest utterance the model was trained on (NeMo's train_ds.max_duration): the service "
        "recognizes inputs up to this whole and cuts longer ones at pauses",
    )


class Tokenizer(_Section):
    type: Literal["sentencepiece", "char"] = "char"
    file: str | None = None  # the SentencePiece model, in the tokens directory


class Vocabulary(_Section):
    tokens_file: str
    size: int = Field(description="tokens without the blank; the graph outputs size + 1 classes")
    blank_id: int
    supported_punctuation: list[str] = Field(default_factory=list)
    tokenizer: Tokenizer = Field(default_factory=Tokenizer)


class StreamingGraph(_Section):
    """One cache-aware streaming graph (one lookahead) of a cache-aware FastConformer.

    Its inputs are NeMo's ``cache_support`` export: ``audio_signal`` [B, n_mels, window],
    ``length`` [B], ``cache_last_channel`` [B, *cache_last_channel], ``cache_last_time``
    [B, *cache_last_time], ``cache_last_channel_len`` [B]; its outputs log-probs [B, T, V+1],
    encoded lengths and the next caches. Chunk sizes are feature frames, as NeMo's
    ``streaming_cfg`` gives them ([first step, later steps]); each step's input is the chunk
    after ``pre_encode_cache`` frames of the previous audio (zeros before the first), and the
    graph drops ``drop_extra_pre_encoded`` frames after subsampling (NeMo's
    ``pad_and_drop_preencoded`` streaming, as sherpa-onnx runs it too).
    """

    file: str
    sha256: str
    att_context_size: list[int] = Field(description="[left, right] attention context, encoder frames")
    lookahead_s: float = Field(description="right context in seconds: how far each step looks ahead")
    chunk_frames: int = Field(description="feature frames a step adds (NeMo's shift_size, later steps)")
    pre_encode_cache: int = Field(description="feature frames of earlier audio before each chunk")
    drop_extra_pre_encoded: int
    valid_out_len: int = Field(description="encoder frames a step yields")
    cache_last_channel: list[int] = Field(description="per-stream cache shape [layers, frames, d_model]")
    cache_last_time: list[int] = Field(description="per-stream cache shape [layers, d_model, kernel - 1]")


class StreamingSection(_Section):
    """A cache-aware model's streaming graphs, one per lookahead it was trained with."""

    graphs: list[StreamingGraph]
    default: int = Field(0, description="index of the graph used when a session names no lookahead")


class LanguageModelSection(_Section):
    """An n-gram LM for beam search, in the package folder: token-level ARPA as NeMo builds them
    for BPE models (token id i written as the character chr(i + 100)); ``.gz`` allowed."""

    file: str
    sha256: str
    order: int
    unit: Literal["token"] = "token"
    source: str = Field("", description="what text it was estimated from, and how")


class DecodingSection(_Section):
    """How the package decodes by default (a request may choose otherwise).

    Names follow NeMo's ``beam_batch`` config: ``lm_weight`` is ``ngram_lm_alpha``,
    ``word_bonus`` is ``beam_beta`` (added per emitted token), ``hotword_weight`` is
    ``boosting_tree_alpha``, ``hotword_score`` and ``hotword_depth_scaling`` are the boosting
    tree's ``context_score`` and ``depth_scaling``.
    """

    method: Literal["greedy", "beam"] = "greedy"
    beam_size: int = Field(4, ge=1)
    beam_threshold: float = Field(20.0, gt=0)
    lm_weight: float = Field(0.0, ge=0)
    word_bonus: float = 0.0
    hotword_weight: float = Field(1.0, ge=0)
    hotword_score: float = Field(1.0, gt=0)
    hotword_depth_scaling: float = Field(2.0, ge=0)
    lm: LanguageModelSection | None = None
    measured: str = Field("", description="why these values: the measurement that chose them")


class NemoStateSection(_Section):
    """Not read by the service: ``training/train.py --init-from`` rebuilds the NeMo weights from it."""

    file: str
    in_onnx: int
    stored: int


class Manifest(_Section):
    """Everything the runtime needs to serve a package, as the export read it from the model."""

    format_version: Literal[1] = 1  # FORMAT_VERSION
    name: str
    language: str | None = None
    model_class: str
    source: str = ""
    nemo_version: str | None = None
    torch_version: str | None = None
    exported_at: str | None = None
    parameters: int | None = None
    onnx: OnnxSection = Field(default_factory=OnnxSection)
    features: FeatureConfig
    encoder: EncoderSection
    vocabulary: Vocabulary
    nemo_state: NemoStateSection | None = None
    streaming: StreamingSection | None = None  # cache-aware models: their streaming graphs
    decoding: DecodingSection | None = None  # beam search defaults and the package's LM; none: greedy

    @classmethod
    def read(cls, pkg_dir: Path) -> Manifest:
        """The validated manifest of the package in ``pkg_dir``; ``PackageError`` says what is wrong."""
        path = pkg_dir / MANIFEST_FILE
        try:
            raw: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PackageError(f"{path}: unreadable: {e}") from e
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise PackageError(
                f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
                "re-export with this version's export_to_onnx.py"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise PackageError(f"{path}: {where}: {first['msg']} ({e.error_count()} problem(s))") from e

    def write(self, pkg_dir: Path) -> Path:
        path = pkg_dir / MANIFEST_FILE
        data = self.model_dump(mode="json")
        for optional in ("streaming", "decoding"):  # absent sections: the manifest as before
            if data.get(optional) is None:
                data.pop(optional, None)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def summary(self) -> dict[str, Any]:
        """What ``/stats`` shows of a loaded model."""
        return {
            "name": self.name,
            "language": self.language,
            "model_class": self.model_class,
            "parameters": self.parameters,
            "sample_rate": self.features.sample_rate,
            "vocab_size": self.vocabulary.size,
            "subsampling_factor": self.encoder.subsampling.factor,
            "frame_shift_s": self.encoder.frame_shift_s,
            "max_audio_s": self.encoder.max_audio_s,
            "nemo_version": self.nemo_version,
            "onnx_sha256": self.onnx.sha256,
            "decoding": self.decoding.method if self.decoding else "greedy",
            "language_model": (
                {"file": self.decoding.lm.file, "order": self.decoding.lm.order, "source": self.decoding.lm.source}
                if self.decoding and self.decoding.lm
                else None
            ),
        }


def list_packages(model_dir: Path) -> list[str]:
    """Names of the packages in ``model_dir`` (directories holding a model.json)."""
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if (p / MANIFEST_FILE).is_file())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (model.json records it for model.onnx)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


ONNX_ASR_CONFIG = "config.json"
ONNX_ASR_VOCAB = "vocab.txt"


def peer_files(manifest: Manifest, tokens_dir: Path) -> dict[str, bytes]:
    """Files that let the peers load the package folder as it is, next to ``model.onnx``.

    onnx-asr (``onnx_asr.load_model(None, path)``) reads ``config.json``: without it, it takes a
    NeMo CTC model for an 8x-subsampling one and cuts every transcript of a 4x model at about
    half. Its token map is ``vocab.txt``, the same lines as ours. sherpa-onnx reads the graph's
    ONNX metadata and the token map in ``tokens/``.
    """
    config = {
        "model_type": "nemo-conformer-ctc",
        "features_size": manifest.features.n_mels,
        "subsampling_factor": manifest.encoder.subsampling.factor,
    }
    return {
        ONNX_ASR_CONFIG: (json.dumps(config, indent=2) + "\n").encode(),
        ONNX_ASR_VOCAB: (tokens_dir / manifest.vocabulary.tokens_file).read_bytes(),
    }


def write_peer_files(pkg_dir: Path, tokens_dir: Path) -> list[Path]:
    """Write ``peer_files`` into ``pkg_dir`` (the exporter does; so can an operator, for an older package)."""
    out = []
    for name, data in peer_files(Manifest.read(pkg_dir), tokens_dir).items():
        (pkg_dir / name).write_bytes(data)
        out.append(pkg_dir / name)
    return out
