"""Step 5: WER and CER (jiwer) of a model package, through the runtime the service uses.

Each test manifest's audio goes through ``service.audio.read_audio`` and
``service.models.Recognizer`` (numpy features, ONNX Runtime, the package's decoding: beam search
with its LM for the default model, greedy with ``--greedy``): exactly the service's path, without
HTTP. Prints a Markdown table, then (``--by-voice``) WER and CER per voice of each
set, from the manifests' ``voice`` field: which voices the model fails on; and (``--seen-text
train.json [more ...]``, manifests or plain text) the error rate of reference words by how often
the training text has them (never, 1-4 times, 5 or more): a greedy CTC model with no language
model must spell a word it never heard from its sounds alone, so unseen words bound the WER that
more training steps can reach (measured: see training/README.md).

Usage:
    python -m training.evaluate --model en_synth_conformer_ctc \
        --sets training/data/audio/test_voices.json training/data/audio/test_heldout.json \
               training/data/audio/test_noisy.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import jiwer

from service.audio import read_audio
from service.config import Settings
from service.decoders import DecodeRequest
from service.models import ModelPackage, Recognizer
from training.text import RARE


def _scores(refs: list[str], hyps: list[str]) -> dict[str, float | int]:
    return {"utterances": len(refs), "wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps)}


FREQ_BINS = ("unseen", f"seen 1-{RARE - 1}", f"seen {RARE}+")


def _freq_bin(count: int) -> str:
    return FREQ_BINS[0] if count == 0 else FREQ_BINS[1] if count < RARE else FREQ_BINS[2]


def word_errors_by_frequency(
    refs: list[str], hyps: list[str], seen: collections.Counter[str]
) -> dict[str, dict[str, float | int]]:
    """Share and error rate (substituted or deleted; insertions have no reference word) of the
    reference words in each training-frequency bin."""
    words: collections.Counter[str] = collections.Counter()
    wrong: collections.Counter[str] = collections.Counter()
    for ref, hyp in zip(refs, hyps, strict=True):
        ref_words = ref.split()
        for chunk in jiwer.process_words(ref, hyp).alignments[0]:
            for k in range(chunk.ref_start_idx, chunk.ref_end_idx):
                b = _freq_bin(seen[ref_words[k]])
                words[b] += 1
                wrong[b] += chunk.type != "equal"
    total = sum(words.values()) or 1
    return {
        b: {"words": words[b], "share": words[b] / total, "error_rate": wrong[b] / (words[b] or 1)} for b in FREQ_BINS
    }


def evaluate(
    rec: Recognizer,
    manifest: Path,
    batch: int = 8,
    limit: int = 0,
    seen: collections.Counter[str] | None = None,
    decode: DecodeRequest | None = None,
) -> dict[str, Any]:
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
        hyps += [t.text for t in rec.transcribe(audios, decode)]
        refs += [it["text"] for it in chunk]
    elapsed = time.perf_counter() - t0
    by_voice: dict[str, tuple[list[str], list[str]]] = {}
    for it, ref, hyp in zip(items, refs, hyps, strict=True):
        r, h = by_voice.setdefault(it.get("voice", "?"), ([], []))
        r.append(ref)
        h.append(hyp)
    return {
        **_scores(refs, hyps),
        "hours": round(audio_s / 3600, 3),
        "rtf": elapsed / audio_s if audio_s else 0.0,
        "by_voice": {v: _scores(r, h) for v, (r, h) in sorted(by_voice.items())},
        **({"by_word_frequency": word_errors_by_frequency(refs, hyps, seen)} if seen is not None else {}),
    }


def training_words(path: Path) -> list[str]:
    """The words of a training text: a NeMo manifest (JSON lines with "text") or one sentence per line."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if line.strip():
            words += (json.loads(line)["text"] if line.lstrip().startswith("{") else line).split()
    return words


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="package name (default: the service's default model)")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--tokens-dir", type=Path)
    p.add_argument("--sets", type=Path, nargs="+", required=True, help="NeMo manifests (audio_filepath, text)")
    p.add_argument("--limit", type=int, default=0, help="first N utterances of each set (0 = all)")
    p.add_argument("--by-voice", action="store_true", help="also print WER and CER per voice of each set")
    p.add_argument(
        "--seen-text",
        type=Path,
        nargs="+",
        help="training text (NeMo manifests or plain text, a sentence per line): also print word errors by how "
        "often it has the word",
    )
    p.add_argument("--json", type=Path, help="also write the results (with the breakdowns) here")
    p.add_argument(
        "--greedy",
        action="store_true",
        help="greedy CTC instead of the package's own decoding (beam + LM if it has one)",
    )
    args = p.parse_args()

    s = Settings()
    model_dir, tokens_dir = args.model_dir or s.model_dir, args.tokens_dir or s.tokens_dir
    from service.registry import default_model_name

    name = args.model or default_model_name(s)
    rec = Recognizer(ModelPackage.open(model_dir, tokens_dir, name), intra_op_threads=s.resolved_intra_op_threads())
    seen = None
    if args.seen_text:
        seen = collections.Counter(w for path in args.seen_text for w in training_words(path))
    decode = DecodeRequest(method="greedy") if args.greedy else None
    results = {m.stem: evaluate(rec, m, limit=args.limit, seen=seen, decode=decode) for m in args.sets}
    print(f"model: {name}\n")
    print("| test set | utterances | hours | WER | CER | RTF |")
    print("|---|---|---|---|---|---|")
    for k, r in results.items():
        print(
            f"| {k} | {r['utterances']} | {r['hours']:.2f} | {100 * r['wer']:.1f} % | {100 * r['cer']:.1f} % "
            f"| {r['rtf']:.4f} |"
        )
    if args.by_voice:
        print("\n| test set | voice | utterances | WER | CER |\n|---|---|---|---|---|")
        for k, r in results.items():
            for v, sc in r["by_voice"].items():
                print(f"| {k} | {v} | {sc['utterances']} | {100 * sc['wer']:.1f} % | {100 * sc['cer']:.1f} % |")
    if seen is not None:
        print("\n| test set | reference words | " + " | ".join(FREQ_BINS) + " |")
        print("|---|---|" + "---|" * len(FREQ_BINS))
        for k, r in results.items():
            f = r["by_word_frequency"]
            cells = " | ".join(
                f"{100 * f[b]['share']:.1f} % of words, {100 * f[b]['error_rate']:.1f} % wrong" for b in FREQ_BINS
            )
            print(f"| {k} | {sum(f[b]['words'] for b in FREQ_BINS)} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps({"model": name, "results": results}, indent=1))


if __name__ == "__main__":
    main()
