"""NeMo's own buffered CTC streaming (``FrameBatchASR``) on audio files (runs in the export venv).

Drives ``FrameBatchASR`` as NeMo's ``examples/asr/asr_chunked_inference/ctc/
speech_to_text_buffered_infer_ctc.py`` does: ``tokens_per_chunk = ceil(chunk / model_stride)``,
``mid_delay = ceil((chunk + (buffer - chunk) / 2) / model_stride)``, the signal padded at the
end by ``mid_delay`` model strides of zeros (``read_audio_file``), then ``transcribe``.
The runtime's ``service.live.buffered`` must give the same tokens, step for step.

Each preset runs twice: as NeMo ships it ("nemo": the initial feature buffer is 0.0, because
``FeatureFrameBufferer`` tests ``hasattr(preprocessor, "log")``, false for mel models) and with
the fill NeMo means, the log-mel of silence ("silence": ``ZERO_LEVEL_SPEC_DB_VAL = -16.635``
set before ``reset()``), which is what the service uses.

Usage: python -m tests.nemo_side.buffered_ref --nemo model.nemo --out DIR --preset 1.6:4.0 FILE.wav ...
Writes DIR/buffered.json: {"chunk:buffer/fill": [{"file", "text", "unmerged"}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nemo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", action="append", required=True, help="chunk_s:buffer_s")
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)

    import soundfile as sf
    from nemo.collections.asr.models import ASRModel
    from nemo.collections.asr.parts.utils.streaming_utils import AudioFeatureIterator, FrameBatchASR

    model = ASRModel.restore_from(str(args.nemo), map_location="cpu")
    model.eval()
    if hasattr(model, "ctc_decoder"):
        model.change_decoding_strategy(decoder_type="ctc", verbose=False)
    if not hasattr(model, "tokenizer"):
        # Character models have no tokenizer, which FrameBatchASR reads for the blank id and the
        # final text. Lend it one over the model's own vocabulary: the labels stay NeMo's.
        from types import SimpleNamespace

        vocab = list(model.decoder.vocabulary)
        model.tokenizer = SimpleNamespace(vocabulary=vocab, ids_to_text=lambda ids: "".join(vocab[i] for i in ids))
    feature_stride = model._cfg.preprocessor["window_stride"]
    model_stride_in_secs = feature_stride * int(model._cfg.encoder.get("subsampling_factor", 4))
    sr = model._cfg.sample_rate

    out: dict[str, list[dict[str, object]]] = {}
    for preset in args.preset:
        chunk_s, buffer_s = (float(v) for v in preset.split(":"))
        tokens_per_chunk = math.ceil(chunk_s / model_stride_in_secs)
        mid_delay = math.ceil((chunk_s + (buffer_s - chunk_s) / 2) / model_stride_in_secs)
        for fill in ("nemo", "silence"):
            asr = FrameBatchASR(asr_model=model, frame_len=chunk_s, total_buffer=buffer_s, batch_size=4)
            if fill == "silence":
                asr.frame_bufferer.ZERO_LEVEL_SPEC_DB_VAL = -16.635
            rows = []
            for f in args.files:
                x, rate = sf.read(str(f), dtype="float32")
                assert rate == sr and x.ndim == 1, f"{f}: give {sr} Hz mono files"
                asr.reset()  # (re)fills the buffers with ZERO_LEVEL_SPEC_DB_VAL
                # read_audio_file, on samples already read
                samples = np.pad(x, (0, int(mid_delay * model_stride_in_secs * sr)))
                asr.set_frame_reader(AudioFeatureIterator(samples, asr.frame_len, asr.raw_preprocessor, model.device))
                text = asr.transcribe(tokens_per_chunk, mid_delay)
                rows.append({"file": f.name, "text": text, "unmerged": [int(t) for t in asr.unmerged]})
            out[f"{preset}/{fill}"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "buffered.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
