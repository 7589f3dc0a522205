"""A Devanagari vocabulary, as the product's reference model (stt_hi_conformer_ctc_medium) has.

The model is a NeMo-built random Conformer-CTC with a SentencePiece tokenizer trained on Hindi
text (``tests/nemo_side/build_model.py --arch hindi``), run on Hindi speech from espeak-ng. The
parity tests (test_nemo_parity.py, test_export_cli.py) take it as one more architecture:
features, log-probs, transcripts and word timings equal NeMo's. Here: that those transcripts
really are Devanagari, that ``language=hi`` picks it among English models, and that captions
wrap by the characters a reader sees (aksharas: grapheme clusters), not by code points.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

import httpx
import pytest

from service.config import Settings
from service.decoding import Segment
from service.formats import LINE_CHARS, srt
from service.models import ModelPackage, Recognizer
from service.registry import default_model_name
from testkit.server import running_server
from tests.conftest import NemoModel

DEVANAGARI = re.compile("[\u0900-\u097f]")
VIRAMA = "\u094d"


def aksharas(text: str) -> int:
    """Characters on screen, counted independently of the service: a base letter with its vowel
    signs and other marks, and consonants joined by a virama (a conjunct), make one."""
    n, prev = 0, ""
    for ch in text:
        joins = unicodedata.category(ch) in ("Mn", "Mc", "Me") or (prev == VIRAMA and unicodedata.category(ch) == "Lo")
        n += not joins
        prev = ch
    return n


def test_the_hindi_transcripts_are_devanagari(hindi: NemoModel) -> None:
    """What the parity tests compare is real Devanagari decoding: letters, vowel signs, conjuncts."""
    spoken = [t for f, t in zip(hindi.files, hindi.transcripts, strict=True) if f.name.startswith("speech_hi")]
    joined = "".join(spoken)
    assert len(DEVANAGARI.findall(joined)) > 0.8 * len(joined.replace(" ", ""))
    assert any(unicodedata.category(c) in ("Mn", "Mc") for c in joined)  # vowel signs, anusvara, virama
    rec = Recognizer(ModelPackage.open(hindi.model_dir, hindi.tokens_dir, hindi.name))
    assert rec.package.manifest.language == "hi"


@pytest.fixture(scope="module")
def bilingual(hindi: NemoModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bundled English default model and the Hindi model in one server."""
    base = Settings()
    models, tokens = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("tokens")
    default = default_model_name(base)
    for d, pkg_dir, tok_dir in (
        (default, base.model_dir, base.tokens_dir),
        (hindi.name, hindi.model_dir, hindi.tokens_dir),
    ):
        (models / d).symlink_to(pkg_dir / d)
        for f in tok_dir.glob(f"{d}.*"):
            (tokens / f.name).symlink_to(f)
    env = {"ASR_MODEL_DIR": str(models), "ASR_TOKENS_DIR": str(tokens), "ASR_DEFAULT_MODEL": default}
    env["ASR_SPEECH_GATE"] = "false"  # compared with NeMo on every clip, noise included
    with running_server(env) as url:
        yield url


def test_language_hi_picks_the_hindi_model(bilingual: str, hindi: NemoModel) -> None:
    path, expected = next((f, t) for f, t in zip(hindi.files, hindi.transcripts, strict=True) if "speech_hi" in f.name)
    wav = path.read_bytes()
    r = httpx.post(f"{bilingual}/transcribe", files={"file": ("a.wav", wav)}, data={"language": "hi"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == hindi.name and r.json()["language"] == "hi" and r.json()["text"] == expected
    r = httpx.post(f"{bilingual}/transcribe", files={"file": ("a.wav", wav)}, data={"language": "en"}, timeout=60)
    assert r.json()["model"] == default_model_name(Settings())
    r = httpx.post(
        f"{bilingual}/v1/audio/transcriptions",
        files={"file": ("a.wav", wav)},
        data={"model": "whisper-1", "language": "hi"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json() == {"text": expected}


def test_hindi_subtitles_follow_nemos_words_and_wrap_by_aksharas(bilingual: str, hindi: NemoModel) -> None:
    checked = 0
    for path, expected in zip(hindi.files, hindi.transcripts, strict=True):
        data = {"language": "hi", "response_format": "srt"}
        r = httpx.post(f"{bilingual}/transcribe", files={"file": ("a.wav", path.read_bytes())}, data=data, timeout=60)
        assert r.status_code == 200, r.text
        cues = [c.split("\n")[2:] for c in r.text.strip().split("\n\n") if c.strip()]
        assert " ".join(" ".join(lines) for lines in cues).split() == expected.split(), path.name
        for lines in cues:
            assert len(lines) <= 2 and all(aksharas(line) <= LINE_CHARS for line in lines), lines
            checked += len(lines)
    assert checked >= 5


def _segment(text: str) -> Segment:
    return Segment(text=text, start=0.0, end=2.0, words=[])


def test_caption_lines_count_aksharas_not_code_points() -> None:
    # 38 aksharas, 56 code points: one line on screen, though longer than a line in code points.
    short = "मेरा नाम राम है और मैं दिल्ली में रहता हूँ यह"
    assert aksharas(short) <= LINE_CHARS < len(short)
    assert srt([_segment(short)]).split("\n")[2:] == [short, ""]
    # Past a line: two lines, cut at the space nearest the middle counted in aksharas.
    long = "प्रधानमंत्री ने राष्ट्र को संबोधित किया और कल रात ज़ोरदार बारिश हुई और बिजली चली गई"
    first, second = srt([_segment(long)]).split("\n")[2:4]
    assert f"{first} {second}" == long
    words = long.split(" ")
    cuts = [aksharas(" ".join(words[:i])) for i in range(1, len(words))]
    middle = aksharas(long) // 2
    assert aksharas(first) == min(cuts, key=lambda c: abs(c - middle))
