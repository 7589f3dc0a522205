"""NeMo's own cache-aware streaming on audio files, per lookahead (runs in the export venv).

Drives ``conformer_stream_step`` over ``CacheAwareStreamingAudioBuffer`` as NeMo's
``examples/asr/asr_cache_aware_streaming/speech_to_text_cache_aware_streaming_infer.py`` does,
with ``pad_and_drop_preencoded`` on: the first chunk is padded like the later ones and every step
drops the extra pre-encoded frames, which is what an exported graph (fixed at trace time) does,
and what sherpa-onnx runs. For each step it records the encoder input (features), the CTC
log-probs of the frames the step yields, and the greedy labels; and the final text.

Usage: python -m tests.nemo_side.cache_aware_ref --nemo model.nemo --out DIR FILE.wav ...
Writes DIR/cache_aware.npz and DIR/cache_aware.json.
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
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    model = ASRModel.restore_from(str(args.nemo), map_location="cpu")
    model.eval()
    if hasattr(model, "ctc_decoder"):
        model.change_decoding_strategy(decoder_type="ctc", verbose=False)
    enc = model.encoder
    arrays: dict[str, np.ndarray] = {}
    texts: dict[str, list[str]] = {}
    for ctx in [list(c) for c in enc.att_context_size_all]:
        enc.set_default_att_context_size(ctx)
        enc.setup_streaming_params()
        key = f"r{ctx[1]}"
        texts[key] = []
        for fi, f in enumerate(args.files):
            x, _ = sf.read(str(f), dtype="float32")
            buf = CacheAwareStreamingAudioBuffer(model=model, online_normalization=False, pad_and_drop_preencoded=True)
            buf.append_audio(x)
            cache = enc.get_initial_cache_state(batch_size=1)
            cl, ct, cll = cache
            prev = None
            text = ""
            for step, (chunk, clen) in enumerate(iter(buf)):
                with torch.no_grad():
                    out = model.conformer_stream_step(
                        processed_signal=chunk,
                        processed_signal_length=clen,
                        cache_last_channel=cl,
                        cache_last_time=ct,
                        cache_last_channel_len=cll,
                        keep_all_outputs=buf.is_buffer_empty(),
                        previous_pred_out=prev,
                        drop_extra_pre_encoded=enc.streaming_cfg.drop_extra_pre_encoded,
                        return_transcription=True,
                        return_log_probs=True,
                    )
                n_before = 0 if prev is None else len(prev[0])
                prev, hyps, cl, ct, cll = out[0], out[1], out[2], out[3], out[4]
                log_probs = out[6][0]
                n = len(prev[0]) - n_before  # frames this step yields (its encoded length)
                arrays[f"{key}_{fi}_{step}_in"] = chunk[0].numpy()
                arrays[f"{key}_{fi}_{step}_lp"] = log_probs[:n].numpy()
                text = hyps[0].text if hasattr(hyps[0], "text") else str(hyps[0])
            arrays[f"{key}_{fi}_labels"] = prev[0].numpy()
            texts[key].append(text)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "cache_aware.npz", **arrays)
    (args.out / "cache_aware.json").write_text(json.dumps({"texts": texts, "files": [f.name for f in args.files]}))


if __name__ == "__main__":
    main()
