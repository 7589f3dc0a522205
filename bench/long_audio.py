"""Long recordings on the default model: accuracy, speed and memory, side by side in one run.

1. WER of one recording made of held-out sentences against the same sentences one by one, for
   one voice, several voices (espeak-ng variants and flite when installed) and no pauses at all;
   as the service cuts it (at pauses) and as the old fixed 80 s windows did (``ASR_LONG_AUDIO=
   windows``). In process, through ``service.pipeline.transcribe_samples``: the server's path.
2. Throughput through the real server (``python -m service``, default settings): the short
   clips one after another, and the long recording, in audio seconds per second; and what the
   same duration of near-silence and of noise costs against speech.
3. Memory: the server's RSS at idle, during 4 concurrent 20-minute uploads (sampled every
   0.25 s) and for a minute after they end.

    .venv/bin/python -m bench.long_audio [--minutes 20] [--concurrency 4]

Writes bench/results/long_audio.{json,md}. Needs espeak-ng and sox (tests/run.sh installs them).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jiwer
import numpy as np
import soundfile as sf

from bench.common import RESULTS, cpu_info
from service.audio import read_audio
from service.config import Settings
from service.models import ModelPackage, Recognizer
from service.pipeline import audio_plan, transcribe_samples
from service.registry import default_model_name
from testkit.server import running_server
from testkit.speech import HELDOUT_SENTENCES, SENTENCES, synthesize

RATE = 16000
VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb-scotland+m3"]


def speak(text: str, voice: str, out: Path) -> np.ndarray:
    """One sentence: espeak-ng ``voice``, or flite's ``flite:NAME``; 16 kHz float32."""
    if voice.startswith("flite:"):
        raw = out.with_suffix(".flite.wav")
        subprocess.run(["flite", "-voice", voice[6:], "-t", text, "-o", str(raw)], check=True, capture_output=True)
        subprocess.run(["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out)], check=True)
    else:
        synthesize(text, voice, 150, out)
    return read_audio(out, RATE)[0]


def trim(x: np.ndarray) -> np.ndarray:
    """The clip without its leading and trailing silence (for the no-pause recording)."""
    loud = np.flatnonzero(np.abs(x) > 1e-3)
    return x[loud[0] : loud[-1] + 1] if loud.size else x


def recording(clips: list[np.ndarray], pauses: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = []
    for c in clips:
        if pauses:
            parts += [c, np.zeros(int(rng.uniform(0.4, 0.5) * RATE), np.float32)]
        else:
            parts.append(trim(c))
    return np.concatenate(parts)


def accuracy(rec: Recognizer, sets: dict[str, tuple[list[np.ndarray], list[str], bool]]) -> list[dict[str, Any]]:
    rows = []
    plans = {m: audio_plan(Settings(long_audio=m), rec) for m in ("segments", "windows")}
    for name, (clips, texts, pauses) in sets.items():
        one = [rec.transcribe([c])[0].text for c in clips]
        x = recording(clips, pauses, seed=len(rows))
        row: dict[str, Any] = {"set": name, "sentences": len(clips), "minutes": round(x.shape[0] / RATE / 60, 2)}
        row["one_by_one"] = jiwer.wer(texts, one)
        for mode, plan in plans.items():
            t, pieces = transcribe_samples(rec, x, plan)
            row[mode] = jiwer.wer(" ".join(texts), t.text)
            row[f"{mode}_pieces"] = pieces
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def post(url: str, data: bytes) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", data)}, timeout=3600)
    r.raise_for_status()
    return time.perf_counter() - t0


def wav(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def throughput(url: str, clips: list[np.ndarray], long: np.ndarray) -> dict[str, Any]:
    """Audio seconds per second: the clips one by one, then the long recording; then what ten
    minutes of non-speech cost against ten minutes of speech."""
    short_s = sum(c.shape[0] for c in clips) / RATE
    short_t = sum(post(url, wav(c)) for c in clips)
    long_t = post(url, wav(long))
    rng = np.random.default_rng(0)
    n = 600 * RATE
    speech_t = post(url, wav(np.tile(long, int(np.ceil(n / long.shape[0])))[:n]))
    quiet = {
        "near_silence": (rng.integers(-1, 2, n) / 32768).astype(np.float32),
        "white_noise_-26dBFS": (rng.standard_normal(n) * 10 ** (-26 / 20)).astype(np.float32),
    }
    out = {
        "short_clips_audio_s_per_s": short_s / short_t,
        "long_recording_audio_s_per_s": long.shape[0] / RATE / long_t,
        "long_over_short": (long.shape[0] / RATE / long_t) / (short_s / short_t),
    }
    for name, x in quiet.items():
        out[f"{name}_cost_vs_speech"] = post(url, wav(x)) / speech_t
    return out


def rss_mb(url: str) -> float:
    return float(httpx.get(f"{url}/stats", timeout=10).json()["rss_mb"])


def memory(url: str, long: np.ndarray, minutes: float, concurrency: int) -> dict[str, Any]:
    x = np.tile(long, int(np.ceil(minutes * 60 * RATE / long.shape[0])))[: int(minutes * 60 * RATE)]
    data = wav(x)
    before = rss_mb(url)
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_mb(url))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=post, args=(url, data)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    after = []
    for _ in range(12):
        time.sleep(5)
        after.append(rss_mb(url))
    return {
        "uploads": concurrency,
        "minutes_each": minutes,
        "audio_s_per_s": concurrency * minutes * 60 / wall,
        "rss_mb_before": before,
        "peak_rss_mb_during": max(samples),
        "median_rss_mb_during": float(np.median(samples)),
        "rss_mb_after_60s": after[-1],
        "rss_mb_after_series": after,
        "peak_rss_mb_process": float(httpx.get(f"{url}/stats").json()["peak_rss_mb"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    s = Settings()
    name = default_model_name(s)
    rec = Recognizer(ModelPackage.open(s.model_dir, s.tokens_dir, name), intra_op_threads=s.resolved_intra_op_threads())
    texts = HELDOUT_SENTENCES + SENTENCES
    several = [*VOICES, *(["flite:slt", "flite:rms", "flite:awb"] if shutil.which("flite") else [])]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        one_voice = [speak(t, "en-us", d / f"a{i}.wav") for i, t in enumerate(texts)]
        many = [speak(t, several[i % len(several)], d / f"b{i}.wav") for i, t in enumerate(texts)]
    sets = {
        "one voice (espeak-ng en-us), pauses 0.4-0.5 s": (one_voice, texts, True),
        f"{len(several)} voices ({', '.join(several)}), pauses 0.4-0.5 s": (many, texts, True),
        "one voice, no pauses (each clip's silence trimmed)": (one_voice, texts, False),
    }
    long = recording(many, True, seed=9)
    # The server first, while this process is small: a child's high-water mark starts from its
    # parent's RSS at fork (Linux keeps it across exec), which would inflate its peak_rss_mb.
    with running_server({"ASR_LOG_LEVEL": "warning"}) as url:
        idle = rss_mb(url)  # loaded and warmed up, nothing served yet
        speed = throughput(url, many, long)
        print(json.dumps(speed), flush=True)
        mem = {"idle_at_start_rss_mb": idle, **memory(url, long, args.minutes, args.concurrency)}
        print(json.dumps({k: v for k, v in mem.items() if k != "rss_mb_after_series"}), flush=True)
        two_hours = memory(url, long, 120, 1)
        print(json.dumps({k: v for k, v in two_hours.items() if k != "rss_mb_after_series"}), flush=True)
    rows = accuracy(rec, sets)
    result = {
        "model": name,
        "cpu": cpu_info(),
        "accuracy": rows,
        "throughput": speed,
        "memory": mem,
        "two_hours": two_hours,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "long_audio.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "long_audio.md").write_text(report(result))
    print(report(result))


def report(r: dict[str, Any]) -> str:
    lines = [
        f"Model {r['model']}, {r['cpu']}.",
        "",
        "| recording | sentences | minutes | WER one by one | as one recording (cut at pauses) | old 80 s windows |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["accuracy"]:
        lines.append(
            f"| {row['set']} | {row['sentences']} | {row['minutes']} | {100 * row['one_by_one']:.1f} % "
            f"| {100 * row['segments']:.1f} % ({row['segments_pieces']} pieces) "
            f"| {100 * row['windows']:.1f} % ({row['windows_pieces']} windows) |"
        )
    t, m, h = r["throughput"], r["memory"], r["two_hours"]
    lines += [
        "",
        f"Throughput through the server: short clips {t['short_clips_audio_s_per_s']:.1f} audio s/s, the long "
        f"recording {t['long_recording_audio_s_per_s']:.1f} ({100 * t['long_over_short']:.0f} % of short); "
        f"ten minutes of near-silence cost {100 * t['near_silence_cost_vs_speech']:.1f} % of the time ten minutes "
        f"of speech take, white noise at -26 dBFS {100 * t['white_noise_-26dBFS_cost_vs_speech']:.1f} %.",
        "",
        f"Memory, {m['uploads']} concurrent {m['minutes_each']:g}-minute uploads "
        f"({m['audio_s_per_s']:.1f} audio s/s): idle at start {m['idle_at_start_rss_mb']:.0f} MB, before the "
        f"uploads (after the throughput runs) {m['rss_mb_before']:.0f} MB, during: peak "
        f"{m['peak_rss_mb_during']:.0f} MB, median {m['median_rss_mb_during']:.0f} MB; one minute after: "
        f"{m['rss_mb_after_60s']:.0f} MB (process high-water mark {m['peak_rss_mb_process']:.0f} MB).",
        "",
        f"One 2-hour upload ({h['audio_s_per_s']:.1f} audio s/s): before {h['rss_mb_before']:.0f} MB, during: "
        f"peak {h['peak_rss_mb_during']:.0f} MB; one minute after: {h['rss_mb_after_60s']:.0f} MB "
        f"(high-water mark {h['peak_rss_mb_process']:.0f} MB).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
