"""Offline speech for tests and benchmarks: espeak-ng voices, converted with sox."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


# Sentences spoken by espeak-ng for the parity clips (the model is random: any speech will do,
# but real speech gives realistic spectra and lengths).
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "a speech recognition service turns audio into text",
    "please call stella and ask her to bring these things with her from the store",
    "six spoons of fresh snow peas five thick slabs of blue cheese",
    "we also need a small plastic snake and a big toy frog for the kids",
    "it was the best of times it was the worst of times",
    "hello world",
    "numbers one two three four five six seven eight nine ten",
    "the rain in spain stays mainly in the plain",
    "how much wood would a woodchuck chuck",
    "to be or not to be that is the question",
    "peter piper picked a peck of pickled peppers",
    "every good boy does fine",
    "yes",
    "the weather today is sunny with a chance of rain in the evening",
]
VOICES = ["en", "en-us", "en-gb-x-rp", "en+f3", "en-us+m2", "en-gb-scotland", "en+f5", "en-us+klatt"]


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def synthesize(text: str, voice: str, speed: int, out: Path, rate: int = 16000) -> Path:
    """Speak ``text`` with espeak-ng, then convert with sox to ``rate`` Hz mono 16-bit WAV.

    sox -D: no dither, so the clips are byte-identical from run to run and the NeMo cache hits.
    """
    raw = out.with_suffix(".espeak.wav")
    _run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text])
    _run(["sox", "-D", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(out)])
    raw.unlink()
    return out


# Sentences of the default model's test split (never trained on), and voices for them that are
# accents and variants of the training voices: the shipped model's held-out check.
HELDOUT_SENTENCES = [
    s
    for s in (Path(__file__).resolve().parent.parent / "tests" / "data" / "heldout_sentences.txt")
    .read_text()
    .split("\n")
    if s
]
HELDOUT_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb-scotland+m3"]


def synthesize_heldout(d: Path) -> list[Path]:
    """The held-out sentences spoken by espeak-ng, one 16 kHz WAV each, in order."""
    return [
        synthesize(t, HELDOUT_VOICES[i % len(HELDOUT_VOICES)], 150 + 10 * (i % 4), d / f"h{i}.wav")
        for i, t in enumerate(HELDOUT_SENTENCES)
    ]


# Hindi sentences for the Devanagari parity model (espeak-ng's "hi" voice speaks them); some are
# in its tokenizer's text (tests/nemo_side/build_model.py), some not.
HINDI_SENTENCES = [
    "मेरा नाम राम है और मैं दिल्ली में रहता हूँ",
    "आज मौसम बहुत अच्छा है",
    "कृपया दरवाज़ा बंद कर दीजिए",
    "भारत एक विशाल देश है जिसमें अनेक भाषाएँ बोली जाती हैं",
    "बच्चे पार्क में क्रिकेट खेल रहे हैं",
    "क्या आप मुझे पानी का एक गिलास दे सकते हैं",
    "ट्रेन दस मिनट देर से पहुँचेगी",
    "हमारे विद्यालय में एक बड़ा पुस्तकालय है",
    "सोमवार को बाज़ार में सब्ज़ियाँ सस्ती थीं",
    "प्रधानमंत्री ने राष्ट्र को संबोधित किया",
    "कल रात ज़ोरदार बारिश हुई और बिजली चली गई",
    "धन्यवाद फिर मिलेंगे",
    "मुझे हिंदी संगीत सुनना पसंद है",
    "शहर की सड़कों पर बहुत भीड़ है",
    "डॉक्टर ने कहा कि आराम करना ज़रूरी है",
    "हम अगले साल पहाड़ों पर घूमने जाएँगे",
]
