"""Long audio: windowed against unchunked decoding, side by side in one run; and what silence costs.

For each length: compute time of one pass over the whole recording (what NeMo's transcribe()
does) and of the service's windows (``service.longform``, same model, same threads), their
ratio, and the WER between the two transcripts (jiwer). Then the voice-activity question:
the same speech with pauses making up half the recording, windowed, against the speech alone.

    .venv/bin/python -m bench.long_audio [--model NAME] [--seconds 60 180 600]

Runs on the bundled default model unless told otherwise (speed depends on the model's shape;
agreement between windowed and unchunked needs trained weights: a random model's frames all
depend on the whole recording). Lengths beyond the model's one-pass limit (``max_audio_s`` in
model.json; the bundled model is exported with 80 s, one window) are skipped: to measure them,
export a package with a larger ``--max-audio-s`` and pass ``--model``. Writes
bench/results/long_audio.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

import jiwer
import numpy as np

from bench.common import RESULTS, cpu_info, speech
from service.config import Settings
from service.models import ModelPackage, Recognizer
from service.pipeline import audio_plan, transcribe_samples
from service.registry import default_model_name


def timed(fn, repeat: int = 2):  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="")
    p.add_argument("--seconds", type=float, nargs="+", default=[60, 180, 600])
    args = p.parse_args()
    s = Settings()
    name = args.model or default_model_name(s)
    rec = Recognizer(ModelPackage.open(s.model_dir, s.tokens_dir, name), intra_op_threads=s.resolved_intra_op_threads())
    plan = audio_plan(s, rec)
    rows = []
    for sec in args.seconds:
        if sec > rec.max_audio_s:  # the graph's positional table ends there (export --max-audio-s)
            print(f"{sec:6.0f} s: skipped, {name} takes at most {rec.max_audio_s:g} s in one pass", flush=True)
            continue
        x = speech(sec, seed=int(sec))
        t_whole, whole = timed(lambda x=x: rec.transcribe([x])[0])
        t_win, (win, n) = timed(lambda x=x: transcribe_samples(rec, x, plan))
        wer = jiwer.wer(whole.text, win.text) if whole.text else float("nan")
        rows.append({"seconds": sec, "windows": n, "unchunked_s": t_whole, "windowed_s": t_win, "wer_between": wer})
        print(f"{sec:6.0f} s: unchunked {t_whole:6.2f} s, {n} windows {t_win:6.2f} s "
              f"(x{t_whole / t_win:.2f}), WER between {100 * wer:.2f} %", flush=True)  # fmt: skip

    # Silence: 120 s of speech, then the same clips with a pause after each (half the recording).
    sec = 120.0
    x = speech(sec, seed=7)
    rng = np.random.default_rng(7)
    pieces, i = [], 0
    while i < x.shape[0]:
        n = int(rng.integers(2, 6) * 16000)
        pieces += [x[i : i + n], np.zeros(n, np.float32)]
        i += n
    padded = np.concatenate(pieces)
    t_speech, (a, _) = timed(lambda: transcribe_samples(rec, x, plan))
    t_padded, (b, _) = timed(lambda: transcribe_samples(rec, padded, plan))
    silence = {
        "speech_s": sec,
        "with_pauses_s": padded.shape[0] / 16000,
        "time_speech_only_s": t_speech,
        "time_with_pauses_s": t_padded,
        "wer_between": jiwer.wer(a.text, b.text) if a.text else float("nan"),
    }
    print(f"silence: {sec:.0f} s of speech {t_speech:.2f} s; with pauses ({silence['with_pauses_s']:.0f} s) "
          f"{t_padded:.2f} s: a perfect VAD would save {1 - t_speech / t_padded:.0%}", flush=True)  # fmt: skip

    result = {
        "model": name,
        "cpu": cpu_info(),
        "plan": {"chunk_s": s.chunk_s, "context_s": s.chunk_context_s},
        "rows": rows,
        "silence": silence,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "long_audio.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"Model `{name}`, {cpu_info()}; windows of {s.chunk_s:g} s + {s.chunk_context_s:g} s context each side.",
        "",
        "| audio | windows | unchunked (s) | windowed (s) | unchunked / windowed | WER between |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['seconds']:.0f} s | {r['windows']} | {r['unchunked_s']:.2f} | {r['windowed_s']:.2f} | "
        f"{r['unchunked_s'] / r['windowed_s']:.2f} | {100 * r['wer_between']:.2f} % |"
        for r in rows
    ]
    lines += [
        "",
        f"Silence: {sec:.0f} s of speech took {t_speech:.2f} s; the same speech with pauses "
        f"({silence['with_pauses_s']:.0f} s) {t_padded:.2f} s; WER between {100 * silence['wer_between']:.2f} %.",
    ]
    (RESULTS / "long_audio.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
