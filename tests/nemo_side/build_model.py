"""Build a small random NeMo CTC model, offline, for parity tests (runs in the export venv).

The model is a real ``EncDecCTCModelBPE`` made by NeMo from a config, with a SentencePiece
tokenizer trained here by NeMo's own helper. Its weights are random, but its preprocessor,
encoder, decoder and decoding are NeMo's code, so it is the honest reference for the runtime.
Some weights are scaled up so that the per-frame argmax varies and transcripts are varied,
non-trivial strings rather than one repeated token.

Usage: python tests/nemo_side/build_model.py --out DIR --arch conformer|fastconformer|medium|... [--seed N]
Writes DIR/model.nemo.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

# Text for the tokenizer: ordinary English so the pieces look like a real model's.
TEXT = """the quick brown fox jumps over the lazy dog
she sells sea shells by the sea shore
a speech recognition service turns audio into text
numbers like one two three four five six seven eight nine ten
how much wood would a woodchuck chuck if a woodchuck could chuck wood
peter piper picked a peck of pickled peppers
the rain in spain stays mainly in the plain
every good boy does fine and all cows eat grass
it was the best of times it was the worst of times
call me ishmael some years ago never mind how long precisely
we hold these truths to be self evident that all men are created equal
to be or not to be that is the question
in the beginning god created the heaven and the earth
hello world this is a test of the emergency broadcast system
the weather today is sunny with a chance of rain in the evening
please transcribe this sentence exactly as it was spoken
"""

# Hindi text for the Devanagari model's tokenizer (written for these tests; everyday sentences
# with conjuncts, nukta, anusvara and chandrabindu, as stt_hi_conformer_ctc_medium's vocabulary has).
HINDI_TEXT = """मेरा नाम राम है और मैं दिल्ली में रहता हूँ
आज मौसम बहुत अच्छा है
कृपया दरवाज़ा बंद कर दीजिए
भारत एक विशाल देश है जिसमें अनेक भाषाएँ बोली जाती हैं
हम कल सुबह स्टेशन जाएँगे
बच्चे पार्क में क्रिकेट खेल रहे हैं
क्या आप मुझे पानी का एक गिलास दे सकते हैं
यह किताब बहुत रोचक है
मुझे हिंदी संगीत सुनना पसंद है
ट्रेन दस मिनट देर से पहुँचेगी
किसान खेत में गेहूँ बो रहा है
नमस्ते आप कैसे हैं
हमारे विद्यालय में एक बड़ा पुस्तकालय है
वह हर दिन योग और व्यायाम करती है
शहर की सड़कों पर बहुत भीड़ है
धन्यवाद फिर मिलेंगे
"""

ARCHS = {
    # Conformer-CTC: striding subsampling by 4, like stt_*_conformer_ctc_*.
    "conformer": {"subsampling": "striding", "subsampling_factor": 4, "d_model": 64, "n_heads": 4},
    # FastConformer-CTC: depthwise-striding subsampling by 8, like parakeet / stt_*_fastconformer.
    "fastconformer": {"subsampling": "dw_striding", "subsampling_factor": 8, "d_model": 64, "n_heads": 4},
    # Character-level EncDecCTCModel (no SentencePiece), like the older QuartzNet/Conformer-char models.
    "char": {"subsampling": "striding", "subsampling_factor": 4, "d_model": 64, "n_heads": 4},
    # Conformer-CTC whose attention sees +-16 frames (0.64 s): a random model that is local like a
    # trained one, so windowed decoding of long audio can be compared with unchunked decoding.
    "local": {"subsampling": "striding", "subsampling_factor": 4, "d_model": 64, "n_heads": 4, "att_context": [16, 16]},
    # Conformer-CTC with a Devanagari SentencePiece vocabulary, like stt_hi_conformer_ctc_medium.
    "hindi": {"subsampling": "striding", "subsampling_factor": 4, "d_model": 64, "n_heads": 4},
    # Cache-aware streaming FastConformer (like stt_en_fastconformer_hybrid_large_streaming_multi):
    # chunked_limited attention with several lookaheads (right context 13, 6, 1, 0 frames of 80 ms),
    # causal convolutions and downsampling, no feature normalization (as those models are trained).
    "streaming": {
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "d_model": 64,
        "n_heads": 4,
        "att_context": [[70, 13], [70, 6], [70, 1], [70, 0]],
        "streaming": True,
    },
    # The exact shape of stt_hi_conformer_ctc_medium (for bench/: speed depends on shape, not weights).
    "medium": {
        "subsampling": "striding",
        "subsampling_factor": 4,
        "d_model": 256,
        "n_heads": 4,
        "n_layers": 18,
        "ff_expansion_factor": 4,
        "subsampling_conv_channels": 256,
        "conv_kernel_size": 31,
    },
}
# The shape of stt_en_fastconformer_hybrid_large_streaming_multi (bench/: speed depends on shape).
ARCHS["streaming_large"] = {
    "subsampling": "dw_striding",
    "subsampling_factor": 8,
    "d_model": 512,
    "n_heads": 8,
    "n_layers": 17,
    "ff_expansion_factor": 4,
    "subsampling_conv_channels": 256,
    "conv_kernel_size": 9,
    "att_context": [[70, 13], [70, 6], [70, 1], [70, 0]],
    "streaming": True,
}
# The shapes of nvidia/parakeet-ctc-0.6b and -1.1b (FastConformer, d_model 1024, 8x depthwise
# subsampling; 24 and 42 layers): bench/big_model.py, for size, load and speed (not in CI).
for _name, _layers in (("parakeet_0.6b", 24), ("parakeet_1.1b", 42)):
    ARCHS[_name] = {
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "d_model": 1024,
        "n_heads": 8,
        "n_layers": _layers,
        "ff_expansion_factor": 4,
        "subsampling_conv_channels": 256,
        "conv_kernel_size": 9,
    }
ARCHS["streaming_hybrid"] = ARCHS["streaming"]  # the same, hybrid RNNT/CTC (served through its CTC head)
CHAR_LABELS = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]


def build(out: Path, arch: str, seed: int, vocab_size: int, text: Path | None = None) -> Path:
    import torch
    from nemo.collections.asr.models import EncDecCTCModel, EncDecCTCModelBPE
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tok-", dir=out))
    text_file = work / "text.txt"
    if text is not None:  # a corpus big enough for a real model's vocabulary (1024 pieces for parakeet)
        shutil.copyfile(text, text_file)
    else:
        text_file.write_text((HINDI_TEXT if arch == "hindi" else TEXT) * 4, encoding="utf-8")
    create_spt_model(
        str(text_file),
        vocab_size=vocab_size,
        sample_size=-1,
        do_lower_case=True,
        tokenizer_type="bpe",
        output_dir=str(work / "tokenizer"),
    )
    a = ARCHS.get(arch, ARCHS["conformer"])
    cfg = {
        "sample_rate": 16000,
        "tokenizer": {"dir": str(work / "tokenizer"), "type": "bpe"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "normalize": "NA" if a.get("streaming") else "per_feature",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": 80,
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1e-5,
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 80,
            "feat_out": -1,
            "n_layers": a.get("n_layers", 2),
            "d_model": a["d_model"],
            "subsampling": a["subsampling"],
            "subsampling_factor": a["subsampling_factor"],
            "subsampling_conv_channels": a.get("subsampling_conv_channels", 64),
            "ff_expansion_factor": a.get("ff_expansion_factor", 2),
            "self_attention_model": "rel_pos",
            "n_heads": a["n_heads"],
            "att_context_size": a.get("att_context", [-1, -1]),
            **(
                {"att_context_style": "chunked_limited", "conv_context_size": "causal", "causal_downsampling": True}
                if a.get("streaming")
                else {}
            ),
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": a.get("conv_kernel_size", 9),
            "conv_norm_type": "batch_norm",
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": a["d_model"],
            "num_classes": -1,
            "vocabulary": [],
        },
        "validation_ds": {
            "manifest_filepath": None,
            "sample_rate": 16000,
            "batch_size": 4,
            "shuffle": False,
        },
        "optim": {"name": "adamw", "lr": 1e-3},
    }
    if arch in ("rnnt", "hybrid", "streaming_hybrid", "streaming_large"):
        from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel, EncDecRNNTBPEModel

        cfg["model_defaults"] = {"enc_hidden": a["d_model"], "pred_hidden": 32, "joint_hidden": 32}
        cfg["decoder"] = {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "prednet": {"pred_hidden": 32, "pred_rnn_layers": 1},
        }
        cfg["joint"] = {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "jointnet": {"joint_hidden": 32, "activation": "relu", "encoder_hidden": a["d_model"], "pred_hidden": 32},
        }
        cfg["decoding"] = {"strategy": "greedy_batch", "greedy": {"max_symbols": 5}}
        if arch == "rnnt":  # not a CTC model: the exporter must refuse it
            EncDecRNNTBPEModel(cfg=OmegaConf.create(cfg)).save_to(str(out / "model.nemo"))
            return out / "model.nemo"
        # Hybrid RNNT/CTC (like stt_*_fastconformer_hybrid_*): served through its CTC head.
        cfg["aux_ctc"] = {
            "ctc_loss_weight": 0.3,
            "decoder": {
                "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                "feat_in": a["d_model"],
                "num_classes": -1,
                "vocabulary": [],
            },
            "decoding": {"strategy": "greedy"},
        }
        model = EncDecHybridRNNTCTCBPEModel(cfg=OmegaConf.create(cfg))
        ctc_head = model.ctc_decoder
    elif arch == "char":
        del cfg["tokenizer"]
        cfg["labels"] = CHAR_LABELS
        cfg["validation_ds"]["labels"] = CHAR_LABELS
        cfg["decoder"].update(num_classes=len(CHAR_LABELS), vocabulary=CHAR_LABELS)
        model = EncDecCTCModel(cfg=OmegaConf.create(cfg))
        ctc_head = model.decoder
    else:
        model = EncDecCTCModelBPE(cfg=OmegaConf.create(cfg))
        ctc_head = model.decoder
    with torch.no_grad():
        # Random init gives near-constant posteriors (one token or blank everywhere). Scale the
        # subsampling convolutions (so frames differ) and the decoder (so argmax follows them).
        for mod in model.encoder.pre_encode.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.weight.mul_(4.0)
        ctc_head.decoder_layers[0].weight.mul_(8.0)
    model.eval()
    path = out / "model.nemo"
    model.save_to(str(path))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", choices=sorted({*ARCHS, "rnnt", "hybrid"}), default="conformer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--text", type=Path, help="train the tokenizer on this text instead of the built-in lines")
    args = p.parse_args()
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build(args.out, args.arch, args.seed, args.vocab_size, args.text))


if __name__ == "__main__":
    main()
