"""Rendering a transcript: plain text, SRT and WebVTT subtitles, verbose JSON.

``json`` and ``verbose_json`` bodies are built by the routes (the native and the
OpenAI-compatible API differ there); this module holds what they share: subtitle timing
and layout, and the segment / word dictionaries.
"""

from __future__ import annotations

from typing import Any, Literal

from service.decoding import Segment, Word, graphemes

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
LINE_CHARS = 42  # caption line length (two lines per cue at most: see SEGMENT_MAX_CHARS)


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _caption_lines(text: str) -> str:
    """One line, or two broken at the space nearest the middle when longer than a caption line.

    Lengths are in grapheme clusters (``graphemes``), so Devanagari lines are as long on screen
    as Latin ones.
    """
    chars = graphemes(text)
    if len(chars) <= LINE_CHARS or " " not in chars:
        return text
    mid = len(chars) // 2
    spaces = [i for i, c in enumerate(chars) if c == " "]
    cut = min(spaces, key=lambda i: abs(i - mid))
    return "".join(chars[:cut]) + "\n" + "".join(chars[cut + 1 :])


def _cue_times(segments: list[Segment]) -> list[tuple[float, float]]:
    """Cue times: a cue never ends before it starts, and never overlaps the next one."""
    out = []
    for i, s in enumerate(segments):
        end = max(s.end, s.start + 0.001)
        if i + 1 < len(segments):
            end = min(end, max(segments[i + 1].start, s.start + 0.001))
        out.append((s.start, end))
    return out


def srt(segments: list[Segment]) -> str:
    cues = []
    for i, (s, (a, b)) in enumerate(zip(segments, _cue_times(segments), strict=True), 1):
        cues.append(f"{i}\n{_timestamp(a, ',')} --> {_timestamp(b, ',')}\n{_caption_lines(s.text)}\n")
    return "\n".join(cues)


def vtt(segments: list[Segment]) -> str:
    cues = [
        f"{_timestamp(a, '.')} --> {_timestamp(b, '.')}\n{_caption_lines(s.text)}\n"
        for s, (a, b) in zip(segments, _cue_times(segments), strict=True)
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def word_dict(w: Word, confidence: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"word": w.word, "start": w.start, "end": w.end}
    if confidence:
        d["confidence"] = w.confidence
    return d


def segment_dict(i: int, s: Segment) -> dict[str, Any]:
    return {
        "id": i,
        "start": s.start,
        "end": s.end,
        "text": s.text,
        "confidence": round(s.confidence, 4),
        "avg_logprob": round(s.avg_logprob, 4),
    }
