"""Compute NeMo's own outputs for a list of audio files (runs in the export venv).

For each file: the preprocessor's features in eval mode (dither 0, pad_to 0, as transcribe()
sets them), the model's log-probs and encoder lengths from its forward pass on the raw audio,
and ``model.transcribe()``'s text and word timestamps. Also the features of all files as one padded batch of
unequal lengths. The runtime tests compare the service against these.

Usage: python tests/nemo_side/reference.py --nemo model.nemo --out DIR FILE.wav ...
Writes DIR/reference.npz and DIR/reference.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nemo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)

    import soundfile as sf
    import torch
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(str(args.nemo), map_location="cpu")
    model.eval()
    hybrid = hasattr(model, "ctc_decoder")
    if hybrid:  # serve hybrid RNNT/CTC models through the CTC head, as the export does
        model.change_decoding_strategy(decoder_type="ctc", verbose=False)
    pre = model.preprocessor
    pre.featurizer.dither = 0.0
    pre.featurizer.pad_to = 0

    arrays: dict[str, np.ndarray] = {}
    signals = []
    with torch.no_grad():
        for i, path in enumerate(args.files):
            x, sr = sf.read(str(path), dtype="float32")
            assert sr == pre.featurizer.sample_rate and x.ndim == 1, f"{path}: give 16 kHz mono files"
            signals.append(x)
            sig = torch.from_numpy(x)[None]
            ln = torch.tensor([x.shape[0]])
            feats, flen = pre(input_signal=sig, length=ln)
            arrays[f"feat_{i}"] = feats[0, :, : int(flen[0])].numpy()
            if hybrid:
                encoded, enc_len = model.forward(input_signal=sig, input_signal_length=ln)
                logprobs = model.ctc_decoder(encoder_output=encoded)
            else:
                logprobs, enc_len, _ = model.forward(input_signal=sig, input_signal_length=ln)
            arrays[f"logprobs_{i}"] = logprobs[0, : int(enc_len[0])].numpy()

        # One padded batch of unequal lengths through the preprocessor.
        lengths = torch.tensor([s.shape[0] for s in signals])
        batch = torch.zeros(len(signals), int(lengths.max()))
        for i, s in enumerate(signals):
            batch[i, : s.shape[0]] = torch.from_numpy(s)
        bfeats, blen = pre(input_signal=batch, length=lengths)
        arrays["batch_feats"] = bfeats.numpy()
        arrays["batch_lengths"] = blen.numpy()

    hyps = model.transcribe([str(f) for f in args.files], batch_size=4, verbose=False)
    texts = [h.text if hasattr(h, "text") else str(h) for h in hyps]
    # Word timings as NeMo computes them (transcribe(timestamps=True): offsets in encoder frames,
    # start/end in seconds).
    timed = model.transcribe([str(f) for f in args.files], batch_size=4, verbose=False, timestamps=True)
    words = [
        [
            {
                k: (float(w[k]) if k != "word" else str(w[k]))
                for k in ("word", "start_offset", "end_offset", "start", "end")
            }
            for w in h.timestamp["word"]
        ]
        for h in timed
    ]

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "reference.npz", **arrays)
    (args.out / "reference.json").write_text(
        json.dumps(
            {"files": [str(f) for f in args.files], "transcripts": texts, "words": words}, indent=1, ensure_ascii=False
        )
    )


if __name__ == "__main__":
    main()
