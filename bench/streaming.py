"""Live transcription under real-time-paced clients, against the real server (issue 32).

    .venv/bin/python -m bench.streaming [--capacity-s 120] [--levels 10,20,30,40] [--medium-levels 5,10,20]

Each client is an OpenAI Realtime WebSocket session (``/v1/realtime``, server VAD, 24 kHz PCM16
as OpenAI clients send it) that plays its audio in 100 ms appends at the speed of speech.

1. Latency and accuracy, per preset, on the default model's 24 held-out sentences (espeak-ng,
   voices it was not trained on), each played as [0.3 s silence, sentence, 1.5 s silence]:
   - word -> partial: from a word's end in the audio (the offline transcript's word times) to
     the first event that shows it (``delta``: text the stream made final; ``provisional``:
     the right context's guess, the /live page's grey text); p50/p95;
   - end of speech -> final: from the last word's end to the ``completed`` event; p50/p95;
   - WER of the completed transcripts, of the stream's own text (in process, the same engine),
     and of offline recognition of the same audio (jiwer, lower-cased).
2. Capacity: N clients, each playing sentence after sentence without a break, for
   ``--capacity-s``; the server's step wait, final latency p95 in the first and last third
   (lag is flat when the last third is not worse than the first by more than 50 % + 0.2 s), RSS.
   For the default model and the stt_hi_conformer_ctc_medium-shaped model (random weights:
   its text is noise, its compute is the real model's).
3. 200 sessions opened and closed one after another (1 s of audio each, committed): RSS before,
   after 100 and after 200.
Writes bench/results/streaming.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import time
from typing import Any

import httpx
import jiwer
import numpy as np
import soundfile as sf
import soxr
import websockets

from bench.common import CACHE, RESULTS, cpu_info, medium_model, rss_mb, server_env
from service.live.buffered import PRESETS, BufferedCtcStream, Geometry, transcribe_buffered
from service.models import ModelPackage, Recognizer
from testkit.nemo import ROOT
from testkit.server import running_server
from testkit.speech import HELDOUT_SENTENCES, synthesize_heldout

STEP_S = 0.1
LEAD_S, TAIL_S = 0.3, 1.5
DEFAULT = "en_synth_conformer_ctc"


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def norm(s: str) -> str:
    return " ".join(s.lower().split())


def heldout() -> list[tuple[np.ndarray, str]]:
    d = CACHE / "heldout"
    d.mkdir(parents=True, exist_ok=True)
    files = synthesize_heldout(d)
    return [(sf.read(f, dtype="float32")[0], t) for f, t in zip(files, HELDOUT_SENTENCES, strict=True)]


def word_ends(url: str, x: np.ndarray) -> tuple[list[float], str]:
    """The offline transcript's word end times (s) and text, from the server's own REST route."""
    f = CACHE / "tmp.wav"
    sf.write(f, x, 16000, subtype="PCM_16")
    r = httpx.post(
        f"{url}/v1/audio/transcriptions",
        files={"file": f.read_bytes()},
        data={"response_format": "verbose_json", "timestamp_granularities[]": "word"},
        timeout=60,
    )
    r.raise_for_status()
    body = r.json()
    return [float(w["end"]) for w in body.get("words", [])], body["text"]


def update(rate: int) -> str:
    vad = {"type": "server_vad", "silence_duration_ms": 500, "prefix_padding_ms": 300}
    fmt = {"type": "audio/pcm", "rate": rate}
    return json.dumps(
        {
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": {"format": fmt, "turn_detection": vad}}},
        }
    )


async def play(
    url: str,
    turns: list[np.ndarray],
    preset: str,
    rate: int = 24000,
    until_s: float = float("inf"),
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Play ``turns`` (16 kHz, each already padded with silence) back to back in real time.

    Returns the events with their arrival time (s since the first append) and each turn's start time.
    """
    q = f"intent=transcription&provisional=true&preset={preset}" + "".join(
        f"&{k}={v}" for k, v in (query or {}).items()
    )
    events: list[tuple[float, dict[str, Any]]] = []
    starts: list[float] = []
    async with websockets.connect(url.replace("http", "ws") + "/v1/realtime?" + q, max_size=None) as ws:
        await ws.recv()
        await ws.send(update(rate))
        t0 = time.monotonic()

        async def reader() -> None:
            async for m in ws:
                events.append((time.monotonic() - t0, json.loads(m)))

        rd = asyncio.create_task(reader())
        sent = 0.0
        for x in turns:
            if sent >= until_s:
                break
            starts.append(sent)
            pcm = (np.clip(soxr.resample(x, 16000, rate), -1, 1) * 32767).astype("<i2").tobytes()
            step = int(rate * STEP_S) * 2
            for i in range(0, len(pcm), step):
                await asyncio.sleep(max(0.0, t0 + sent - time.monotonic()))
                await ws.send(
                    json.dumps(
                        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()}
                    )
                )
                sent += len(pcm[i : i + step]) / 2 / rate
        want = len(starts)
        deadline = time.monotonic() + 15
        while sum(e["type"].endswith(".completed") for _, e in events) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        rd.cancel()
    return {"events": events, "starts": starts}


def turn_figures(played: dict[str, Any], meta: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per turn: word->delta and word->provisional lags, end->final lag, texts (events matched by item order)."""
    events = played["events"]
    items: list[str] = []
    for _, e in events:
        if e["type"] == "input_audio_buffer.speech_started" and e["item_id"] not in items:
            items.append(e["item_id"])
    out = []
    for item, start, m in zip(items, played["starts"], meta, strict=False):
        mine = [(t, e) for t, e in events if e.get("item_id") == item]
        ends = [start + LEAD_S + w for w in m["word_ends"]]
        delta_text, delta_lag, prov_lag = "", [], []
        shown_d: list[float] = []
        shown_p: list[float] = []
        completed = None
        for t, e in mine:
            if e["type"].endswith(".delta"):
                delta_text += e["delta"]
                while len(shown_d) < len(delta_text.split()):
                    shown_d.append(t)
            elif e["type"].endswith(".provisional"):
                while len(shown_p) < len(e["text"].split()):
                    shown_p.append(t)
            elif e["type"].endswith(".completed"):
                completed = (t, e["transcript"])
        for k, end in enumerate(ends):
            if k < len(shown_d):
                delta_lag.append(shown_d[k] - end)
            first = min(
                [
                    x
                    for x in (shown_d[k] if k < len(shown_d) else None, shown_p[k] if k < len(shown_p) else None)
                    if x is not None
                ],
                default=None,
            )
            if first is not None:
                prov_lag.append(first - end)
        out.append(
            {
                "ref": m["ref"],
                "final": completed[1] if completed else "",
                "final_lag": (completed[0] - ends[-1]) if completed and ends else None,
                "delta_lag": delta_lag,
                "partial_lag": prov_lag,
            }
        )
    return out


def stream_wer(clips: list[tuple[np.ndarray, str]], preset: str) -> float:
    rec = Recognizer(ModelPackage.open(ROOT / "models", ROOT / "tokens", DEFAULT), intra_op_threads=2)
    g = Geometry.of(PRESETS[preset], rec.features, rec.subsampling.factor)

    def run(b: np.ndarray) -> np.ndarray:
        return rec.engine.run(b, np.full(b.shape[0], b.shape[2], np.int64))

    hyps = []
    for x, _ in clips:
        padded = np.concatenate(
            [np.zeros(int(LEAD_S * 16000), np.float32), x, np.zeros(int(TAIL_S * 16000), np.float32)]
        )
        hyps.append(
            norm(rec.detokenize(transcribe_buffered(run, BufferedCtcStream(rec.features, g, rec.blank_id), padded)))
        )
    return float(jiwer.wer([norm(t) for _, t in clips], hyps))


def padded(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(int(LEAD_S * 16000), np.float32), x, np.zeros(int(TAIL_S * 16000), np.float32)])


async def latency_run(
    url: str, clips: list[tuple[np.ndarray, str]], meta: list[dict[str, Any]], preset: str, parallel: int = 6
) -> list[dict[str, Any]]:
    """Each sentence in its own session; ``parallel`` sessions at a time."""
    out: list[dict[str, Any]] = []
    for i in range(0, len(clips), parallel):
        group = list(range(i, min(i + parallel, len(clips))))
        played = await asyncio.gather(*(play(url, [padded(clips[j][0])], preset) for j in group))
        for j, p in zip(group, played, strict=True):
            out += turn_figures(p, [meta[j]])
    return out


MAX_FINAL_S = 2.0  # a final later than this after the end of speech is not live any more


def keeps_up(p95_first: float | None, p95_last: float | None) -> bool:
    """Lag is flat (the last third no worse than the first by 50 % + 0.2 s) and live (under 2 s)."""
    if p95_first is None or p95_last is None:
        return False
    return p95_last <= 1.5 * p95_first + 0.2 and p95_last < MAX_FINAL_S


async def capacity_run(
    url: str,
    clips: list[tuple[np.ndarray, str]],
    meta: list[dict[str, Any]],
    n: int,
    seconds: float,
    pid: int,
    preset: str,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    rss: list[float] = []

    async def sample() -> None:
        while True:
            rss.append(rss_mb(pid))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    order = [list(np.random.default_rng(c).permutation(len(clips))) for c in range(n)]
    played = await asyncio.gather(
        *(
            play(url, [padded(clips[j][0]) for j in order[c] * 10], preset, until_s=seconds, query=query)
            for c in range(n)
        )
    )
    sampler.cancel()
    finals: list[tuple[float, float]] = []  # (turn start, final lag)
    deltas: list[float] = []
    for c, p in enumerate(played):
        figs = turn_figures(p, [meta[j] for j in order[c] * 10])
        for start, f in zip(p["starts"], figs, strict=False):
            if f["final_lag"] is not None:
                finals.append((start, f["final_lag"]))
            deltas += f["partial_lag"]
    third = seconds / 3
    first = [lag for s, lag in finals if s < third]
    last = [lag for s, lag in finals if s >= 2 * third]
    stats = httpx.get(f"{url}/stats").json()["live"]
    p95_first, p95_last = pct(first, 95), pct(last, 95)
    flat = keeps_up(p95_first, p95_last)
    return {
        "clients": n,
        "turns": len(finals),
        "final_p95_first_third_s": p95_first,
        "final_p95_last_third_s": p95_last,
        "final_p95_s": pct([lag for _, lag in finals], 95),
        "partial_p95_s": pct(deltas, 95),
        "server_step_wait_ms": stats["step_wait_ms"],
        "flat": flat,
        "rss_mb": {"mean": round(statistics.mean(rss), 1), "peak": round(max(rss), 1)} if rss else None,
    }


async def open_close(url: str, n: int, x: np.ndarray) -> None:
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    for _ in range(n):
        async with websockets.connect(url.replace("http", "ws") + "/v1/realtime?intent=transcription") as ws:
            await ws.recv()
            fmt = {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}
            await ws.send(
                json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": fmt}}})
            )
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            async for m in ws:
                if json.loads(m)["type"].endswith(".completed"):
                    break


def summary(turns: list[dict[str, Any]]) -> dict[str, Any]:
    refs = [norm(t["ref"]) for t in turns]
    finals = [norm(t["final"]) for t in turns]
    dl = [v for t in turns for v in t["delta_lag"]]
    pl = [v for t in turns for v in t["partial_lag"]]
    fl = [t["final_lag"] for t in turns if t["final_lag"] is not None]
    return {
        "turns": len(turns),
        "wer_finals": round(float(jiwer.wer(refs, finals)), 4),
        "word_to_delta_s": {"p50": pct(dl, 50), "p95": pct(dl, 95)},
        "word_to_partial_s": {"p50": pct(pl, 50), "p95": pct(pl, 95)},
        "end_to_final_s": {"p50": pct(fl, 50), "p95": pct(fl, 95)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity-s", type=float, default=120.0)
    p.add_argument("--levels", default="10,20,30,40")
    p.add_argument("--medium-levels", default="5,10,20")
    p.add_argument("--presets", default=",".join(PRESETS))
    args = p.parse_args()
    clips = heldout()
    out: dict[str, Any] = {"machine": cpu_info(), "presets": {}, "capacity": [], "capacity_medium": []}
    procs: list[subprocess.Popen[str]] = []
    with running_server({"ASR_STREAM_MAX": "64"}, process=procs) as url:
        pid = procs[0].pid
        meta = []
        offline = []
        for x, t in clips:
            ends, text = word_ends(url, padded(x))
            meta.append({"ref": t, "word_ends": [e - LEAD_S for e in ends]})
            offline.append(norm(text))
        out["wer_offline"] = round(float(jiwer.wer([norm(t) for _, t in clips], offline)), 4)
        print("offline WER", out["wer_offline"], flush=True)
        for preset in args.presets.split(","):
            turns = asyncio.run(latency_run(url, clips, meta, preset))
            s = summary(turns)
            s["wer_stream"] = round(stream_wer(clips, preset), 4)
            g = Geometry.of(
                PRESETS[preset], Recognizer(ModelPackage.open(ROOT / "models", ROOT / "tokens", DEFAULT)).features, 4
            )
            s["compute_ratio"] = round(g.compute_ratio, 2)
            out["presets"][preset] = s
            print(preset, json.dumps(s), flush=True)
        for n in [int(v) for v in args.levels.split(",") if v]:
            r = asyncio.run(capacity_run(url, clips, meta, n, args.capacity_s, pid, "balanced"))
            out["capacity"].append(r)
            print("capacity", json.dumps(r), flush=True)
        rss0 = rss_mb(pid)
        x1 = clips[0][0][:16000]
        asyncio.run(open_close(url, 100, x1))
        time.sleep(2)
        rss100 = rss_mb(pid)
        asyncio.run(open_close(url, 100, x1))
        time.sleep(2)
        out["sessions_200_rss_mb"] = {
            "before": round(rss0, 1),
            "after_100": round(rss100, 1),
            "after_200": round(rss_mb(pid), 1),
        }
        print("200 sessions", out["sessions_200_rss_mb"], flush=True)
    if args.medium_levels:
        models, tokens = medium_model()
        procs = []
        with running_server({**server_env(models, tokens), "ASR_STREAM_MAX": "64"}, process=procs) as url:
            for n in [int(v) for v in args.medium_levels.split(",") if v]:
                r = asyncio.run(capacity_run(url, clips, meta, n, args.capacity_s, procs[0].pid, "balanced"))
                out["capacity_medium"].append(r)
                print("capacity medium", json.dumps(r), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "streaming.md").write_text(markdown(out, args) + "\n")
    print(markdown(out, args))


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def p50_95(d: dict[str, Any]) -> str:
    return f"{d['p50']} / {d['p95']}"


def markdown(out: dict[str, Any], args: argparse.Namespace) -> str:
    md = [
        f"Machine: {out['machine']}. Default model, 24 held-out sentences, one session each, real-time "
        "paced (24 kHz PCM16 in 100 ms appends, server VAD 500 ms). Offline WER on the same audio "
        f"(each sentence with its silences, one upload): {out['wer_offline'] * 100:.1f} %.",
        "",
        row("preset", "chunk / buffer s", "encoder s per audio s", "WER finals", "WER stream alone",
            "word -> delta p50 / p95 s", "word -> partial p50 / p95 s", "end of speech -> final p50 / p95 s"),
        row(*["---"] * 8),
    ]  # fmt: skip
    for name, s in out["presets"].items():
        p = PRESETS[name]
        md.append(
            row(name, f"{p.chunk_s} / {p.buffer_s}", s["compute_ratio"], f"{s['wer_finals'] * 100:.1f} %",
                f"{s['wer_stream'] * 100:.1f} %", p50_95(s["word_to_delta_s"]), p50_95(s["word_to_partial_s"]),
                p50_95(s["end_to_final_s"]))
        )  # fmt: skip
    for label, rows in (
        ("default model", out["capacity"]),
        ("stt_hi_conformer_ctc_medium shape", out["capacity_medium"]),
    ):
        if not rows:
            continue
        md += [
            "",
            f"Capacity, {label}, preset balanced, {args.capacity_s:.0f} s of continuous speech per client:",
            "",
            row("clients", "turns", "final p95 first / last third s", "word -> partial p95 s",
                "server step wait p95 ms", "flat", "RSS mean / peak MB"),
            row(*["---"] * 7),
        ]  # fmt: skip
        for r in rows:
            rss = r["rss_mb"] or {}
            md.append(
                row(r["clients"], r["turns"], f"{r['final_p95_first_third_s']} / {r['final_p95_last_third_s']}",
                    r["partial_p95_s"], r["server_step_wait_ms"]["p95"], "yes" if r["flat"] else "no",
                    f"{rss.get('mean')} / {rss.get('peak')}")
            )  # fmt: skip
    if "sessions_200_rss_mb" in out:
        s = out["sessions_200_rss_mb"]
        md += ["", f"200 sessions opened and closed in a row: RSS {s['before']} MB before, "
               f"{s['after_100']} after 100, {s['after_200']} after 200."]  # fmt: skip
    return "\n".join(md)


if __name__ == "__main__":
    main()
