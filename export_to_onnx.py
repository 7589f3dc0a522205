#!/usr/bin/env python3
"""Export a NeMo CTC model to the service's model package (offline step; needs NeMo).

Input: a ``.nemo`` file, or a NeMo pretrained name (e.g. ``stt_hi_conformer_ctc_medium``) on a
host with network access. Output, under the project root (or the directories you name):

    models/<name>/model.onnx   NeMo's own ONNX export (encoder + CTC decoder, log-softmax output),
                               with metadata for sherpa-onnx and onnx-asr
    models/<name>/model.onnx.data  its weights, when they pass protobuf's 2 GB limit (external data)
    models/<name>/model.json   every parameter the runtime needs, read from the model itself
    models/<name>/nemo_state.npz  with model.onnx, the NeMo weights exactly (for training runs
                               that continue from the package; the service does not read it)
    tokens/<name>.txt          token map: one "piece id" line per token, then "<blk> V"
    tokens/<name>.model        the SentencePiece model, for exact detokenization (BPE models)

Supported: EncDecCTCModel, EncDecCTCModelBPE, and hybrid RNNT/CTC models through their CTC head.
Run it in its own virtual environment (requirements-export.txt); the service never imports NeMo.

Examples:
    python export_to_onnx.py my_model.nemo --name en_small --language en
    python export_to_onnx.py stt_hi_conformer_ctc_medium --language hi     # needs network
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

# The runtime's own definitions of the package contract (numpy and pydantic, no FastAPI). Run as a
# script, this file's folder (the project root) is the first entry of sys.path, so ``service``
# imports from the checkout; installed with ``pip install .``, from the installed package.
from service.decoding import SPACE_PIECE, Subsampling
from service.features import FeatureConfig
from service.package import (
    EncoderSection,
    ExternalDataSection,
    Manifest,
    NemoStateSection,
    OnnxSection,
    StreamingGraph,
    StreamingSection,
    Vocabulary,
    sha256_file,
    write_peer_files,
)

ROOT = Path(__file__).resolve().parent


class ExportError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _looks_like_path(source: str) -> bool:
    return source.endswith(".nemo") or os.sep in source or source.startswith(".")


def load_model(source: str) -> Any:
    """Restore a NeMo ASR model from a .nemo file or a pretrained name, with clear errors."""
    path = Path(source)
    if path.exists() or _looks_like_path(source):
        if not path.is_file():
            raise ExportError(f"{source}: no such file")
        if not tarfile.is_tarfile(path):
            raise ExportError(
                f"{source}: not a .nemo archive (a .nemo file is a tar archive holding "
                "model_config.yaml and model_weights.ckpt)"
            )
        from nemo.collections.asr.models import ASRModel

        try:
            return ASRModel.restore_from(str(path), map_location="cpu")
        except Exception as e:  # NeMo raises many types here; the user needs the message.
            raise ExportError(f"{source}: NeMo could not restore this archive: {e}") from e

    from nemo.collections.asr.models import ASRModel

    try:
        return ASRModel.from_pretrained(source, map_location="cpu")
    except Exception as e:
        raise ExportError(
            f"could not fetch the pretrained model '{source}': {type(e).__name__}: {e}\n"
            "This host may have no network access. Download the .nemo file on a machine that "
            "has (for example from NGC or Hugging Face), copy it here, and pass its path: "
            f"python export_to_onnx.py /path/to/{source}.nemo"
        ) from e


def ctc_parts(model: Any) -> tuple[Any, str]:
    """Return (ctc decoder module, model type) or raise if the model has no CTC head."""
    cls = type(model).__name__
    if hasattr(model, "ctc_decoder") and hasattr(model, "change_decoding_strategy"):
        # Hybrid RNNT/CTC: switch inference and export to the CTC head.
        model.change_decoding_strategy(decoder_type="ctc", verbose=False)
        model.set_export_config({"decoder_type": "ctc"})
        return model.ctc_decoder, cls
    from nemo.collections.asr.models import EncDecCTCModel

    if isinstance(model, EncDecCTCModel):
        return model.decoder, cls
    raise ExportError(
        f"{cls} is not a CTC model. This exporter handles EncDecCTCModel, EncDecCTCModelBPE and "
        "hybrid RNNT/CTC models (exported through their CTC head)."
    )


def refuse_local_attention(model: Any) -> None:
    """Refuse an encoder switched to local attention (``change_attention_model("rel_pos_local_attn")``).

    NeMo 3.0's Longformer-style attention builds its overlapping chunks with ``as_strided``, which
    the ONNX exporter traces with the example input's strides: the graph exports without an error
    and computes wrong log-probs at every length (max |diff| 6-13 on a random FastConformer, at
    20 s and at 37-1001 feature frames). NeMo uses local attention to run hours of audio in one
    pass; the service reaches long audio by windowing the global-attention graph instead
    (``service/longform.py``), which exports exactly.
    """
    enc = getattr(model, "encoder", None)
    if getattr(enc, "self_attention_model", None) == "rel_pos_local_attn":
        raise ExportError(
            "this model's encoder uses local attention (rel_pos_local_attn), which NeMo's ONNX export "
            "does not reproduce (as_strided is traced at one input size). Export it with global attention, "
            "as Parakeet and most NeMo models are trained (model.change_attention_model('rel_pos', [-1, -1])): "
            "the service windows long audio."
        )


def feature_params(model: Any, framing: str) -> dict[str, Any]:
    """Read the preprocessor's parameters from the model (not from defaults typed here)."""
    from nemo.collections.asr.parts.preprocessing.features import FilterbankFeatures

    pre = model.preprocessor
    fb = getattr(pre, "featurizer", None)
    if not isinstance(fb, FilterbankFeatures):
        raise ExportError(
            f"unsupported preprocessor {type(pre).__name__}/{type(fb).__name__}: the runtime "
            "implements AudioToMelSpectrogramPreprocessor (FilterbankFeatures) only"
        )
    if fb.frame_splicing != 1:
        raise ExportError(f"frame_splicing={fb.frame_splicing} is not supported by the runtime")
    cfg = model.cfg.preprocessor
    normalize = fb.normalize
    if not isinstance(normalize, str | None):
        raise ExportError(f"normalize={normalize!r} (fixed mean/std) is not supported by the runtime")
    if normalize not in ("per_feature", "all_features"):
        normalize = None  # NeMo leaves features unnormalized for any other value ("NA", "none", ...)
    guard = fb.log_zero_guard_value
    if isinstance(guard, str):
        import torch

        guard = float(getattr(torch.finfo(torch.float32), guard))
    window = str(cfg.get("window", "hann"))
    if window not in ("hann", "hamming", "blackman", "bartlett", "none"):
        raise ExportError(f"window={window!r} is not supported by the runtime")
    sr = int(fb.sample_rate)
    highfreq = cfg.get("highfreq", None)
    return {
        "sample_rate": sr,
        "window_size_s": float(cfg.get("window_size", fb.win_length / sr)),
        "window_stride_s": float(cfg.get("window_stride", fb.hop_length / sr)),
        "win_length": int(fb.win_length),
        "hop_length": int(fb.hop_length),
        "n_fft": int(fb.n_fft),
        "window": window,
        "n_mels": int(fb.nfilt),
        "lowfreq": float(cfg.get("lowfreq", 0.0) or 0.0),
        "highfreq": float(highfreq) if highfreq else sr / 2.0,
        "mel_norm": cfg.get("mel_norm", "slaney"),
        "preemph": float(fb.preemph) if fb.preemph is not None else None,
        "mag_power": float(fb.mag_power),
        "log": bool(fb.log),
        "log_zero_guard_type": str(fb.log_zero_guard_type),
        "log_zero_guard_value": float(guard),
        "normalize": normalize,
        "pad_value": float(fb.pad_value),
        "exact_pad": bool(fb.exact_pad),
        "framing": framing,
    }


def nemo_framing() -> str:
    """The STFT framing convention of the installed NeMo.

    NeMo >= 2.5 zero-pads the STFT, masks pre-emphasis past the length and counts L // hop
    frames ("zero_pad"); earlier versions reflect-pad and count L // hop + 1 ("reflect_pad").
    """
    import nemo

    major, minor = (int(x) for x in nemo.__version__.split(".")[:2])
    return "zero_pad" if (major, minor) >= (2, 5) else "reflect_pad"


def subsampling_params(model: Any) -> dict[str, Any]:
    """Read how the encoder shortens the time axis, so the runtime can compute encoder lengths."""
    enc = model.encoder
    pre = getattr(enc, "pre_encode", None)
    needed = ("_kernel_size", "_stride", "_left_padding", "_right_padding", "_ceil_mode", "_sampling_num")
    if pre is None or not all(hasattr(pre, a) for a in needed):
        raise ExportError(f"encoder {type(enc).__name__} has no convolutional subsampling the runtime understands")
    if getattr(enc, "reduction_subsampling", None) is not None:
        raise ExportError("encoders with mid-stack reduction (reduction_position) are not supported")
    return {
        "factor": int(enc.subsampling_factor),
        "kernel_size": int(pre._kernel_size),
        "stride": int(pre._stride),
        "all_paddings": int(pre._left_padding + pre._right_padding),
        "ceil_mode": bool(pre._ceil_mode),
        "repeat_num": int(pre._sampling_num),
    }


def trained_max_duration(model: Any) -> float | None:
    """The longest utterance the model was trained on (``train_ds.max_duration``), if its config says."""
    train_ds = getattr(model, "cfg", {}).get("train_ds") or {}
    value = train_ds.get("max_duration") if hasattr(train_ds, "get") else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def write_tokens(model: Any, decoder: Any, name: str, tokens_dir: Path) -> dict[str, Any]:
    """Write tokens/<name>.txt (and tokens/<name>.model for SentencePiece models)."""
    vocab = list(decoder.vocabulary)
    tokens_dir.mkdir(parents=True, exist_ok=True)
    tok_path = tokens_dir / f"{name}.txt"
    tokenizer = getattr(model, "tokenizer", None)
    info: dict[str, Any] = {"tokens_file": tok_path.name, "size": len(vocab), "blank_id": len(vocab)}
    # NeMo's CTC decoding removes a space before punctuation marks that the vocabulary holds.
    decoding = getattr(model, "ctc_decoding", None) or getattr(model, "decoding", None)
    info["supported_punctuation"] = sorted(getattr(decoding, "supported_punctuation", None) or [])
    if tokenizer is not None:
        sp = getattr(tokenizer, "tokenizer", None)
        if sp is None or not hasattr(sp, "serialized_model_proto"):
            raise ExportError(f"tokenizer {type(tokenizer).__name__} is not SentencePiece; not supported")
        spm_path = tokens_dir / f"{name}.model"
        spm_path.write_bytes(sp.serialized_model_proto())
        info["tokenizer"] = {"type": "sentencepiece", "file": spm_path.name}
        pieces = [sp.id_to_piece(i) for i in range(len(vocab))]
    else:
        info["tokenizer"] = {"type": "char"}
        pieces = [SPACE_PIECE if p == " " else p for p in vocab]
    with tok_path.open("w", encoding="utf-8") as f:
        for i, p in enumerate(pieces):
            f.write(f"{p} {i}\n")
        f.write(f"<blk> {len(pieces)}\n")
    return info


# Weights smaller than this stay float32 whatever their values: biases and norms weigh little, and
# scalar constants are what ORT's fusions match on.
FP16_MIN_ELEMENTS = 1024


def store_fp16_where_lossless(m: Any) -> int:
    """Store each float32 weight whose every value is a float16 value as float16, behind a Cast.

    Lossless by construction: only tensors that survive float32 -> float16 -> float32 unchanged
    are converted, so the graph computes exactly what it did (the exporter's NeMo check runs on
    the result). ONNX Runtime folds the Casts when it loads the graph (its optimized graph is
    node for node the float32 one's), so inference is unchanged too; the file, the package and
    what git stores for it shrink. A model trained by ``training/train.py`` has fp16-rounded
    weights (its ``round_to_fp16``): its graph halves, 20.9 to 11.8 MB for the default model.
    Other models' weights are rarely float16 values, and stay float32. Changes the ModelProto
    ``m`` in place; returns how many tensors were converted.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = m.graph
    kept, casts = [], []
    inputs = {i.name for i in g.input}  # an initializer that is also an input (old IR) can be overridden: keep it
    for init in g.initializer:
        if (
            init.data_type == TensorProto.FLOAT
            and int(np.prod(init.dims)) >= FP16_MIN_ELEMENTS
            and init.name not in inputs
        ):
            a = numpy_helper.to_array(init)
            with np.errstate(over="ignore"):  # beyond float16's range: inf, which fails the comparison
                h = a.astype(np.float16)
            if np.array_equal(h.astype(np.float32), a):
                half = numpy_helper.from_array(h, init.name + "__fp16")
                kept.append(half)
                casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
                continue
        kept.append(init)
    if casts:
        del g.initializer[:]
        g.initializer.extend(kept)
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(casts + nodes)  # topological order: the Casts feed everything after them
    return len(casts)


PER_CHANNEL = True
INT8_METHOD = "onnxruntime quantize_dynamic: MatMul weights int8 per output channel, activations uint8 per call"


def quantize_int8(graph: Any) -> Any:
    """The ModelProto ``graph`` with ONNX Runtime's dynamic quantization of its MatMuls.

    Dynamic (weights int8 ahead of time, activations scaled per call) needs no calibration audio;
    MatMuls only (the attention and feed-forward projections: most of a Conformer's multiply-adds;
    convolutions stay float32); per output channel. Chosen by measurement (README, "int8").
    A graph past 2 GB goes through the quantizer as external data.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    big = needs_external_data(graph)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        save_graph(graph, src, external=big)
        onnx.checker.check_model(str(src))  # the float graph (the int8 one has com.microsoft ops)
        quantize_dynamic(
            str(src),
            str(out),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=PER_CHANNEL,
            use_external_data_format=big,
        )
        return onnx.load(str(out))  # with its external data, if any, in memory


# Protobuf cannot serialize a message of 2 GiB or more. Past this share of it, the weights go to
# an external data file (the graph structure and metadata need the rest, and some headroom).
PROTOBUF_LIMIT = 2**31
EXTERNAL_DATA_AT = int(PROTOBUF_LIMIT * 0.9)


def needs_external_data(graph: Any) -> bool:
    """Whether ``graph`` (a ModelProto with its weights in memory) is too big for one protobuf file."""
    from onnx import numpy_helper

    total = 0
    for init in graph.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else numpy_helper.to_array(init).nbytes
    return total >= EXTERNAL_DATA_AT


def save_graph(graph: Any, path: Path, external: bool) -> ExternalDataSection | None:
    """Write ``graph`` to ``path``; with ``external``, its weights to ``<path>.data`` beside it.

    One data file (not torch's file per tensor), so a package stays three files an operator can
    copy and a checksum covers. ``graph`` keeps its weights in memory.
    """
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if not external:
        onnx.save(graph, str(path))
        return None
    onnx.save(
        graph,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
        convert_attribute=False,
    )
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it 0600: unreadable to a service running as another user
    onnx.load_external_data_for_model(graph, str(path.parent))  # saving moved them out of the proto
    return ExternalDataSection(file=data.name, sha256=sha256_file(data), bytes=data.stat().st_size)


def add_onnx_metadata(m: Any, meta: dict[str, str]) -> None:
    """Set ``meta`` as the ModelProto's metadata properties (in place)."""
    existing = {p.key: p for p in m.metadata_props}
    for k, v in meta.items():
        prop = existing.get(k) or m.metadata_props.add()
        prop.key, prop.value = k, str(v)


NEMO_STATE_FILE = "nemo_state.npz"


def write_nemo_state(model: Any, graph: Any, onnx_sha256: str, path: Path) -> dict[str, int]:
    """Write ``nemo_state.npz``: with ``model.onnx``, everything needed to rebuild the NeMo state_dict.

    A training run continues from a shipped package with this (``training/train.py --init-from
    models/<name>``), so a package need not also carry the NeMo weights (the 8.6 MB
    ``model.fp16.nemo.gz`` the default package carried until cpu-24, beside the same weights in
    ``model.onnx``: every model shipped cost git both). Each state_dict float32 tensor whose
    values are an initializer's, as they are or transposed (MatMul weights), is indexed by that
    initializer's name; the rest is stored as it is: the depthwise convolutions and their
    BatchNorms (the export folds one into the other), the feature extractor's buffers, integer
    counters. ``onnx_sha256`` ties the index to this ``model.onnx``.
    """
    import hashlib

    import numpy as np
    from onnx import numpy_helper

    def fingerprint(a: Any) -> tuple[tuple[int, ...], bytes]:  # the shape and the float32 bytes, hashed
        return a.shape, hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).digest()

    in_graph: dict[tuple[tuple[int, ...], bytes], str] = {}
    for init in graph.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype.kind == "f":  # float16-stored weights are their float32 values, exactly
            in_graph.setdefault(fingerprint(a), init.name)
    index: dict[str, tuple[str, bool]] = {}
    rest: dict[str, Any] = {}
    for key, tensor in model.state_dict().items():
        a = tensor.detach().cpu().numpy()
        views = [(False, a), (True, a.T)] if a.ndim == 2 else [(False, a)]
        found = None
        if a.dtype == np.float32:
            found = next(((in_graph[fp], t) for t, v in views if (fp := fingerprint(v)) in in_graph), None)
        if found:
            index[key] = found
        else:  # also what a match missed would come to: stored here, never lost
            rest[key] = a
    head = {"onnx_sha256": onnx_sha256, "in_onnx": index}
    with path.open("wb") as f:
        np.savez_compressed(f, __index__=np.array(json.dumps(head)), **rest)
    return {"in_onnx": len(index), "stored": len(rest)}


def read_nemo_state(pkg_dir: Path) -> dict[str, Any]:
    """The NeMo state_dict of a package, as numpy arrays, from ``model.onnx`` and ``nemo_state.npz``.

    Exactly the state_dict the package was exported from (checked in tests/test_training_run.py).
    Refuses a ``model.onnx`` other than the one the index was written for.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    onnx_path = pkg_dir / Manifest.read(pkg_dir).onnx.file
    state_path = pkg_dir / NEMO_STATE_FILE
    if not state_path.is_file():
        raise ExportError(f"{pkg_dir}: no {NEMO_STATE_FILE} (exported before export_to_onnx.py wrote one)")
    with np.load(state_path, allow_pickle=False) as z:
        head = json.loads(str(z["__index__"]))
        state = {k: z[k] for k in z.files if k != "__index__"}
    if sha256_file(onnx_path) != head["onnx_sha256"]:
        raise ExportError(f"{state_path} was written for another {onnx_path.name} (sha256 differs)")
    inits = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
    for key, (name, transposed) in head["in_onnx"].items():
        a = numpy_helper.to_array(inits[name]).astype(np.float32)
        state[key] = np.ascontiguousarray(a.T if transposed else a)
    return state


def is_cache_aware(model: Any) -> bool:
    """A FastConformer trained for cache-aware streaming: chunked-limited attention (NeMo's
    ``att_context_style: chunked_limited``) on a streaming-capable encoder."""
    from nemo.collections.asr.parts.mixins.streaming import StreamingEncoder

    enc = model.encoder
    return isinstance(enc, StreamingEncoder) and getattr(enc, "att_context_style", "") == "chunked_limited"


def _last(v: Any) -> int:
    """NeMo's streaming sizes are an int or [first step, later steps]: the later steps' value."""
    return int(v[-1]) if isinstance(v, list | tuple) else int(v)


def export_streaming(model: Any, out_dir: Path, frame_s: float, meta: dict[str, str]) -> StreamingSection:
    """One cache-aware streaming graph per lookahead the model was trained with (NeMo's
    ``cache_support`` export), each with the metadata sherpa-onnx's online NeMo CTC model reads."""
    import onnx
    import torch

    enc = model.encoder
    contexts = [list(c) for c in getattr(enc, "att_context_size_all", None) or [enc.att_context_size]]
    default = list(enc.att_context_size)
    graphs = []
    model.set_export_config({"cache_support": "True"})
    try:
        for ctx in contexts:
            enc.set_default_att_context_size(ctx)
            enc.setup_streaming_params()
            cfg = enc.streaming_cfg
            channel, time_, _ = enc.get_initial_cache_state(batch_size=1)
            cache_channel = [int(channel.shape[0]), int(channel.shape[2]), int(channel.shape[3])]  # [L, T, D]
            cache_time = [int(time_.shape[0]), int(time_.shape[2]), int(time_.shape[3])]  # [L, D, K-1]
            chunk, pre = _last(cfg.shift_size), _last(cfg.pre_encode_cache_size)
            path = out_dir / f"streaming_r{ctx[1]}.onnx"
            with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
                tmp_onnx = Path(tmp) / "s.onnx"
                model.export(str(tmp_onnx), onnx_opset_version=17)
                graph = onnx.load(str(tmp_onnx))
            add_onnx_metadata(
                graph,
                {
                    **meta,
                    # sherpa-onnx's OnlineNeMoCtcModel: window and shift in feature frames, cache shapes
                    "window_size": str(_last(cfg.chunk_size) + pre),
                    "chunk_shift": str(chunk),
                    **{f"cache_last_channel_dim{i + 1}": str(d) for i, d in enumerate(cache_channel)},
                    **{f"cache_last_time_dim{i + 1}": str(d) for i, d in enumerate(cache_time)},
                },
            )
            onnx.checker.check_model(graph)
            onnx.save(graph, str(path))
            graphs.append(
                StreamingGraph(
                    file=path.name,
                    sha256=sha256_file(path),
                    att_context_size=ctx,
                    lookahead_s=round(ctx[1] * frame_s, 4),
                    chunk_frames=chunk,
                    pre_encode_cache=pre,
                    drop_extra_pre_encoded=int(cfg.drop_extra_pre_encoded),
                    valid_out_len=int(cfg.valid_out_len),
                    cache_last_channel=cache_channel,
                    cache_last_time=cache_time,
                )
            )
    finally:
        model.set_export_config({"cache_support": "False"})
        enc.set_default_att_context_size(default)
        enc.setup_streaming_params()
    return StreamingSection(graphs=graphs, default=contexts.index(default) if default in contexts else 0)


def verify(model: Any, decoder: Any, onnx_path: Path, sub: dict[str, Any], seconds: float = 4.0) -> float:
    """Compare the exported graph with NeMo's forward on the same features; return max |diff|.

    Also checks the length formula against NeMo's encoder for a few lengths.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    sr = int(model.preprocessor.featurizer.sample_rate)
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(1, int(seconds * sr), generator=g) * 0.1
    with torch.no_grad():
        feats, flen = model.preprocessor(input_signal=audio, length=torch.tensor([audio.shape[1]]))
        enc, elen = model.encoder(audio_signal=feats, length=flen)
        ref = decoder(encoder_output=enc)
    out = sess.run(None, {"audio_signal": feats.numpy(), "length": flen.numpy()})[0]
    if out.shape != tuple(ref.shape):
        raise ExportError(f"ONNX output shape {out.shape} differs from NeMo's {tuple(ref.shape)}")
    lengths = Subsampling.from_dict(sub).encoded_lengths
    if int(lengths(flen.numpy())[0]) != int(elen[0]):
        raise ExportError("the recorded subsampling does not reproduce NeMo's encoder lengths")
    for n in (1, 2, 3, 7, 8, 9, 50, 101):
        with torch.no_grad():
            _, e = model.encoder(audio_signal=torch.zeros(1, feats.shape[1], n), length=torch.tensor([n]))
        if int(lengths(np.array([n]))[0]) != int(e[0]):
            raise ExportError(f"subsampling length formula disagrees with NeMo at {n} frames")
    return float(np.max(np.abs(out - ref.numpy())))


def export(
    source: str,
    name: str,
    language: str,
    models_dir: Path,
    tokens_dir: Path,
    max_audio_s: float,
    framing: str | None,
    check: bool,
    quantize: str = "none",
    external_data_mode: str = "auto",
) -> Path:
    import nemo
    import numpy as np
    import onnx
    import torch

    model = load_model(source)
    model.eval()
    decoder, model_type = ctc_parts(model)
    refuse_local_attention(model)
    feats = feature_params(model, framing or nemo_framing())
    sub = subsampling_params(model)

    # The relative positional encoding is a constant of fixed length inside the graph
    # (2 x frames x d_model floats): size it to the encoder frames of max_audio_s, no more and no
    # less, so a short limit makes a small file (NeMo's own default is 5000 frames, ~200 s at
    # 40 ms, 5.8 MB at d_model 144). The service never sends a longer window (ChunkPlan).
    frame_s = feats["hop_length"] / feats["sample_rate"] * sub["factor"]
    max_feat_frames = int(max_audio_s * feats["sample_rate"]) // feats["hop_length"] + 1
    max_enc_frames = int(Subsampling.from_dict(sub).encoded_lengths(np.array([max_feat_frames]))[0]) + 1
    if hasattr(model.encoder, "set_max_audio_length"):
        pos_enc = getattr(model.encoder, "pos_enc", None)
        if pos_enc is not None and hasattr(pos_enc, "pe"):
            del pos_enc.pe  # NeMo's extend_pe only ever grows the table
        model.encoder.set_max_audio_length(max_enc_frames)

    out_dir = models_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp_onnx = Path(tmp) / "model.onnx"
        model.export(str(tmp_onnx), onnx_opset_version=17)
        graph = onnx.load(str(tmp_onnx))  # NeMo's export, finished in memory and written once

    vocab = write_tokens(model, decoder, name, tokens_dir)
    # int8: the MatMul weights as int8 with activations quantized on the fly; the rest float32.
    fp16_tensors = 0 if quantize == "int8" else store_fp16_where_lossless(graph)
    peer_meta = {
        # Read by sherpa-onnx (OfflineRecognizer.from_nemo_ctc) and onnx-asr (nemo-conformer-ctc).
        "vocab_size": str(vocab["size"] + 1),
        "subsampling_factor": str(sub["factor"]),
        "normalize_type": feats["normalize"] or "",
        "model_type": "EncDecCTCModelBPE"
        if "tokenizer" in vocab and vocab["tokenizer"]["type"] != "char"
        else "EncDecCTCModel",
        "version": "1",
        "model_author": "NeMo",
        "language": language,
        "comment": f"exported by export_to_onnx.py from {model_type} with NeMo {nemo.__version__}",
    }
    add_onnx_metadata(graph, peer_meta)
    float_graph = graph
    if quantize == "int8":
        graph = quantize_int8(graph)
        (out_dir / NEMO_STATE_FILE).unlink(missing_ok=True)  # an int8 graph cannot rebuild the NeMo weights
    external_data = save_graph(graph, onnx_path, external=external_data_mode == "always" or needs_external_data(graph))
    del graph
    if quantize != "int8":  # checked from the file: past 2 GB the checker takes no in-memory graph
        onnx.checker.check_model(str(onnx_path))

    onnx_sha256 = sha256_file(onnx_path)
    nemo_state = (
        write_nemo_state(model, float_graph, onnx_sha256, out_dir / NEMO_STATE_FILE) if quantize != "int8" else None
    )
    del float_graph

    max_diff = verify(model, decoder, onnx_path, sub) if check else None
    streaming = None
    if is_cache_aware(model):
        # sherpa-onnx's online NeMo CTC model adds the blank itself: vocab_size without it there.
        streaming = export_streaming(model, out_dir, frame_s, {**peer_meta, "vocab_size": str(vocab["size"])})
    manifest = Manifest(
        name=name,
        language=language,
        model_class=model_type,
        source=str(source),
        nemo_version=nemo.__version__,
        torch_version=torch.__version__.split("+")[0],
        exported_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        parameters=int(sum(p.numel() for p in model.parameters())),
        onnx=OnnxSection(
            file=onnx_path.name,
            sha256=onnx_sha256,
            external_data=external_data,
            max_abs_diff_vs_nemo=max_diff,
            fp16_weights=fp16_tensors,
            precision="int8" if quantize == "int8" else "float32",
            quantization=INT8_METHOD if quantize == "int8" else None,
        ),
        features=FeatureConfig.model_validate(feats),
        encoder=EncoderSection(
            subsampling=Subsampling.model_validate(sub),
            frame_shift_s=frame_s,
            max_audio_s=float(max_audio_s),
            suited_max_s=trained_max_duration(model),
        ),
        vocabulary=Vocabulary.model_validate(vocab),
        # Not read by the service: training/train.py --init-from models/<name> rebuilds the NeMo
        # weights from model.onnx and this file (write_nemo_state).
        nemo_state=NemoStateSection(file=NEMO_STATE_FILE, **nemo_state) if nemo_state else None,
        streaming=streaming,
    )
    manifest.write(out_dir)
    write_peer_files(out_dir, tokens_dir)  # onnx-asr's config.json and vocab.txt
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="export_to_onnx.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="path to a .nemo file, or a NeMo pretrained model name (needs network)")
    p.add_argument("--name", help="package name (default: the file's stem or the pretrained name)")
    p.add_argument("--language", default="und", help="BCP-47 language code recorded for routing (default: und)")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models", help="where models/<name>/ goes")
    p.add_argument("--tokens-dir", type=Path, default=ROOT / "tokens", help="where tokens/<name>.txt goes")
    p.add_argument(
        "--max-audio-s",
        type=float,
        default=600.0,
        help="longest input, in seconds, the graph accepts in one piece (default 600; larger values "
        "grow the file by the positional table: 2 x frames x d_model x 4 bytes)",
    )
    p.add_argument(
        "--framing",
        choices=["zero_pad", "reflect_pad"],
        help="STFT framing to record; default: that of the installed NeMo (zero_pad for >= 2.5)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the ONNX-vs-NeMo comparison after export")
    p.add_argument(
        "--lm-text",
        type=Path,
        nargs="+",
        help="also attach a token-level n-gram LM estimated from these texts (one sentence per line; "
        "attach_lm.py, which sets the decoding defaults too, does the same for an existing package)",
    )
    p.add_argument("--lm-order", type=int, default=6, help="order of the --lm-text LM (default 6)")
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: dynamic int8 MatMuls (smaller, faster on CPUs with VNNI; the NeMo check reports its deviation)",
    )
    p.add_argument(
        "--external-data",
        choices=["auto", "always"],
        default="auto",
        help="weights in model.onnx.data beside the graph: auto (default) when the graph would pass "
        "protobuf's 2 GB limit (Parakeet-CTC 0.6B and up in float32), always for any size",
    )
    args = p.parse_args(argv)

    name = args.name or Path(args.model).name.removesuffix(".nemo")
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        p.error(f"invalid package name {name!r}: use letters, digits, '_', '-', '.'")
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    try:
        out = export(
            args.model,
            name,
            args.language,
            args.models_dir,
            args.tokens_dir,
            args.max_audio_s,
            args.framing,
            check=not args.no_check,
            quantize=args.quantize,
            external_data_mode=args.external_data,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    diff = Manifest.read(out).onnx.max_abs_diff_vs_nemo
    print(f"wrote {out}/model.onnx, {out}/model.json, {args.tokens_dir}/{name}.txt")
    if args.lm_text:
        from attach_lm import attach

        # Greedy stays the default; requests with decoding=beam use the LM at a middling weight.
        # attach_lm.py sets measured weights and can make beam + LM the package's default.
        stats = attach(out, args.tokens_dir, text=args.lm_text, order=args.lm_order, decoding={"lm_weight": 0.5})
        print(f"attached {stats['file']} ({stats['bytes']} bytes): used by requests with decoding=beam")
    if diff is not None:
        print(f"ONNX vs NeMo log-probs: max |diff| = {diff:.2e}")
        if args.quantize == "int8":
            print("int8: the deviation is the quantization's (measure WER with training.evaluate)")
        elif diff > 1e-3:
            print("error: the exported graph does not reproduce NeMo within 1e-3", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
