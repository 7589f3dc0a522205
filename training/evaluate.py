"""Step 5: WER and CER (jiwer) of a model package, through the runtime the service uses.

Each test manifest's audio goes through ``service.audio.read_audio`` and
``service.models.Recognizer`` (numpy features, ONNX Runtime, greedy CTC): exactly the
service's path, without HTTP. Prints a Markdown table.

Usage:
    python -m training.evaluate --model en_synth_fastconformer_ctc \
        --sets training/data/audio/test_voices.json training/data/audio/test_heldout.json \
               training/data/audio/test_noisy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jiwer

from service.audio import read_audio
from service.config import Settings
from service.models import ModelPackage, Recognizer


def evaluate(rec: Recognizer, manifest: Path, batch: int = 8, limit: int = 0) -> dict[str, float | int]:
    items = [json.loads(line) for line in manifest.open()]
    if limit:
        items = items[:limit]
    refs, hyps = [], []
    audio_s = 0.0
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        audios = []
        for it in chunk:
            samples, _ = read_audio(it["audio_filepath"], rec.sample_rate)
            audios.append(samples)
            audio_s += samples.shape[0] / rec.sample_rate
        hyps += [t.text for t in rec.transcribe(audios)]
        refs += [it["text"] for it in chunk]
    elapsed = time.perf_counter() - t0
    return {
        "utterances": len(items),
        "hours": round(audio_s / 3600, 3),
        "wer": jiwer.wer(refs, hyps),
        "cer": jiwer.cer(refs, hyps),
        "rtf": elapsed / audio_s if audio_s else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="package name (default: the service's default model)")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--tokens-dir", type=Path)
    p.add_argument("--sets", type=Path, nargs="+", required=True, help="NeMo manifests (audio_filepath, text)")
    p.add_argument("--limit", type=int, default=0, help="first N utterances of each set (0 = all)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    s = Settings()
    model_dir, tokens_dir = args.model_dir or s.model_dir, args.tokens_dir or s.tokens_dir
    from service.registry import default_model_name

    name = args.model or default_model_name(s)
    rec = Recognizer(ModelPackage.open(model_dir, tokens_dir, name), intra_op_threads=s.resolved_intra_op_threads())
    results = {m.stem: evaluate(rec, m, limit=args.limit) for m in args.sets}
    print(f"model: {name}\n")
    print("| test set | utterances | hours | WER | CER | RTF |")
    print("|---|---|---|---|---|---|")
    for k, r in results.items():
        print(
            f"| {k} | {r['utterances']} | {r['hours']:.2f} | {100 * r['wer']:.1f} % | {100 * r['cer']:.1f} % "
            f"| {r['rtf']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": name, "results": results}, indent=1))


if __name__ == "__main__":
    main()
