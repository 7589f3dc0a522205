"""Bytes in, mono float32 at the model's rate out: detect, decode, validate, downmix, resample.

The format is detected from the bytes, never from the file name: libsndfile (through
soundfile) reads WAV (PCM 8/16/24/32-bit, float), FLAC, OGG/Vorbis, OGG/Opus, MP3, AIFF, AU
and more from their headers. Headerless PCM is accepted when the client says how to read it
(``RawFormat``: sample rate, encoding, channels). Other recognisable files (MP4/AAC, WebM,
AMR, text, ...) are refused with 415 naming what was found.

Audio is read block by block from a seekable file (the upload spooled to disk), downmixed
and resampled with soxr's streaming resampler (HQ), so a long recording never has to sit in
memory whole. Every way a file can be wrong ends in a ``ClientError`` naming the problem,
never in an exception the API would turn into a 500.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from service.errors import ClientError

# Float WAVs may exceed +-1 (headroom, or integer-scaled floats up to 2**23); far beyond that the
# float32 power spectrum overflows to inf. Refuse such input instead of returning NaN garbage.
MAX_FLOAT_PEAK = 1e8
BLOCK_S = 10.0  # seconds of source audio decoded at a time

# Raw PCM encodings: name -> (libsndfile subtype, endianness, bytes per sample).
RAW_ENCODINGS: dict[str, tuple[str, str, int]] = {
    "s16le": ("PCM_16", "LITTLE", 2),
    "s16be": ("PCM_16", "BIG", 2),
    "s24le": ("PCM_24", "LITTLE", 3),
    "s32le": ("PCM_32", "LITTLE", 4),
    "f32le": ("FLOAT", "LITTLE", 4),
    "f64le": ("DOUBLE", "LITTLE", 8),
    "u8": ("PCM_U8", "FILE", 1),
    "s8": ("PCM_S8", "FILE", 1),
    "mulaw": ("ULAW", "FILE", 1),
    "alaw": ("ALAW", "FILE", 1),
}
RAW_ALIASES = {"pcm_s16le": "s16le", "linear16": "s16le", "pcm_f32le": "f32le", "pcm_s32le": "s32le", "ulaw": "mulaw"}
RAW_CONTENT_TYPES = ("audio/pcm", "audio/l16", "audio/x-raw", "audio/raw", "application/octet-stream")


@dataclass(frozen=True)
class RawFormat:
    """How to read headerless PCM: what the client declared."""

    sample_rate: int
    encoding: str = "s16le"
    channels: int = 1

    @classmethod
    def parse(cls, sample_rate: int | None, encoding: str | None, channels: int | None) -> RawFormat | None:
        """Validate the client's raw-PCM parameters (``None`` when no sample rate was given)."""
        if sample_rate is None:
            if encoding is not None or channels is not None:
                raise ClientError(400, "invalid_raw_format", "raw PCM needs sample_rate as well", "sample_rate")
            return None
        if not 1000 <= sample_rate <= 384000:
            raise ClientError(
                400, "invalid_raw_format", f"sample_rate must be 1000-384000 Hz, got {sample_rate}", "sample_rate"
            )
        enc = (encoding or "s16le").lower()
        enc = RAW_ALIASES.get(enc, enc)
        if enc not in RAW_ENCODINGS:
            raise ClientError(
                400,
                "invalid_raw_format",
                f"unknown raw encoding {encoding!r}; one of {', '.join(RAW_ENCODINGS)}",
                "encoding",
            )
        ch = 1 if channels is None else channels
        if not 1 <= ch <= 32:
            raise ClientError(400, "invalid_raw_format", f"channels must be 1-32, got {ch}", "channels")
        return cls(sample_rate, enc, ch)

    @classmethod
    def from_content_type(cls, content_type: str | None) -> RawFormat | None:
        """``audio/L16;rate=16000;channels=2`` (RFC 2586: big-endian) or ``audio/pcm;rate=..``."""
        if not content_type:
            return None
        kind, *params = [p.strip() for p in content_type.split(";")]
        opts = dict(p.split("=", 1) for p in params if "=" in p)
        rate = opts.get("rate") or opts.get("sample_rate")
        if kind.lower() not in RAW_CONTENT_TYPES or rate is None:
            return None
        enc = "s16be" if kind.lower() == "audio/l16" else opts.get("encoding")
        try:
            return cls.parse(int(rate), enc, int(opts["channels"]) if "channels" in opts else None)
        except ValueError:
            raise ClientError(400, "invalid_raw_format", f"bad parameters in Content-Type {content_type!r}") from None


def sniff(head: bytes) -> str | None:
    """Name the container the first bytes belong to (None: no known header)."""
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        if b"OpusHead" in head:
            return "OGG/Opus"
        if b"\x01vorbis" in head:
            return "OGG/Vorbis"
        if b"Speex" in head:
            return "OGG/Speex"
        return "OGG"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE6 == 0xE2):
        return "MP3"  # ID3 tag, or an MPEG audio layer III frame sync
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "AAC (ADTS)"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if head[:4] == b".snd":
        return "AU"
    if head[4:8] == b"ftyp":
        return "MP4/M4A"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "WebM/Matroska"
    if head[:5] == b"#!AMR":
        return "AMR"
    if head[:4] == b"caff":
        return "CAF"
    if head[:4] == b"MThd":
        return "MIDI"
    text = head.lstrip()[:32]
    if len(text) >= 8 and all(32 <= c < 127 or c in (9, 10, 13) for c in text):
        return "text"
    return None


def _check_riff(f: BinaryIO, size: int) -> None:
    """Reject a RIFF/WAVE file whose chunks promise more bytes than were sent.

    libsndfile silently shortens a truncated data chunk; a service should say the upload was
    cut off instead of transcribing part of it. Streaming writers that leave the size as 0 or
    0xFFFFFFFF (length unknown) are accepted.
    """
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return
    fmt = "<I" if head[:4] == b"RIFF" else ">I"
    pos = 12
    while pos + 8 <= size:
        f.seek(pos)
        hdr = f.read(8)
        cid, (csize,) = hdr[:4], struct.unpack(fmt, hdr[4:8])
        body = pos + 8
        if cid == b"data":
            if csize not in (0, 0xFFFFFFFF) and body + csize > size:
                raise ClientError(
                    400,
                    "truncated_audio",
                    f"WAV data chunk declares {csize} bytes but only {size - body} were received; "
                    "the upload looks cut off",
                )
            return
        pos = body + csize + (csize & 1)  # chunks are word-aligned
    raise ClientError(400, "truncated_audio", "WAV file ends before its 'data' chunk; the upload looks cut off")


@dataclass(frozen=True)
class AudioInfo:
    format: str  # libsndfile's container name, e.g. "WAV", "MP3", "RAW"
    subtype: str  # e.g. "PCM_16", "OPUS"
    sample_rate: int  # of the file
    channels: int
    duration_s: float  # as the header declares it (exact for the formats above)


class AudioSource:
    """An uploaded file opened for reading: its header now, mono samples at ``target_rate`` block by block."""

    def __init__(
        self,
        f: BinaryIO,
        target_rate: int,
        *,
        max_duration_s: float,
        min_duration_s: float,
        raw: RawFormat | None = None,
    ):
        self.f, self.target_rate = f, target_rate
        self.decoded_s = 0.0  # seconds read by the last full pass of ``blocks``
        self.max_duration_s, self.min_duration_s = max_duration_s, min_duration_s
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(0)
        if size == 0:
            raise ClientError(400, "empty_file", "the uploaded file is empty")
        head = f.read(64)
        found = sniff(head)
        # Declared raw PCM is read as such unless the bytes begin with an audio file's magic
        # (PCM samples can look like anything else, an MPEG frame sync or text included).
        strong = found in ("WAV", "FLAC", "AIFF", "AU") or (found or "").startswith("OGG") or head[:3] == b"ID3"
        self._raw = None if strong else raw
        if self._raw is None:
            _check_riff(f, size)
        self._sf = self._open(found, head)
        sfile = self._sf
        if sfile.samplerate <= 0 or sfile.channels <= 0:
            raise ClientError(400, "corrupt_audio", f"invalid header: {sfile.samplerate} Hz, {sfile.channels} channels")
        frames = sfile.frames if 0 < sfile.frames < 2**62 else 0
        self.info = AudioInfo(sfile.format, sfile.subtype, sfile.samplerate, sfile.channels, frames / sfile.samplerate)
        if self.info.duration_s > max_duration_s:
            raise self._too_long(self.info.duration_s)

    def _open(self, found: str | None, head: bytes) -> sf.SoundFile:
        self.f.seek(0)
        raw = self._raw
        try:
            if raw is not None:
                subtype, endian, _ = RAW_ENCODINGS[raw.encoding]
                return sf.SoundFile(
                    self.f,
                    format="RAW",
                    samplerate=raw.sample_rate,
                    channels=raw.channels,
                    subtype=subtype,
                    endian=endian,
                )
            return sf.SoundFile(self.f)
        except sf.LibsndfileError as e:
            msg = str(e).split(": ", 1)[-1]
            unknown = "not recognised" in msg.lower() or "unknown format" in msg.lower()
            if unknown or found in (None, "text", "MP4/M4A", "WebM/Matroska", "AMR", "AAC (ADTS)", "MIDI"):
                what = f"a {found} file" if found else f"no known audio header (first bytes {head[:8]!r})"
                raise ClientError(
                    415,
                    "unsupported_format",
                    f"unsupported audio: found {what}; send WAV, FLAC, OGG (Vorbis/Opus), MP3, AIFF or AU, "
                    "or raw PCM with sample_rate (and encoding, channels)",
                    "file",
                ) from None
            raise ClientError(400, "corrupt_audio", f"the {found} file could not be read: {msg}", "file") from None

    def _too_long(self, seconds: float) -> ClientError:
        return ClientError(
            413, "audio_too_long", f"audio is {seconds:.1f} s long; the limit is {self.max_duration_s:g} s"
        )

    def close(self) -> None:
        self._sf.close()

    def blocks(self) -> Iterator[npt.NDArray[np.float32]]:
        """Mono float32 at ``target_rate``, about ``BLOCK_S`` seconds at a time, from the start.

        Validates as it goes: NaN/inf samples, absurd float peaks and a length past the limit
        (headers may understate it) raise ``ClientError``; so does a file with no samples or
        shorter than the minimum, once its end is reached.
        """
        sfile, info = self._sf, self.info
        sfile.seek(0)
        rs = soxr.ResampleStream(info.sample_rate, self.target_rate, 1, dtype="float32", quality="HQ")
        same_rate = info.sample_rate == self.target_rate
        block = max(1, int(BLOCK_S * info.sample_rate))
        total = 0
        while True:
            try:
                x = sfile.read(block, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                raise ClientError(400, "corrupt_audio", f"the audio data could not be decoded: {e}") from None
            last = x.shape[0] < block
            total += x.shape[0]
            if total / info.sample_rate > self.max_duration_s:
                raise self._too_long(total / info.sample_rate)
            if x.size and not np.isfinite(x).all():
                raise ClientError(400, "invalid_samples", "the audio contains NaN or infinite sample values")
            peak = float(np.abs(x).max()) if x.size else 0.0
            if peak > MAX_FLOAT_PEAK:
                raise ClientError(
                    400,
                    "invalid_samples",
                    f"sample values reach {peak:.3g}; float audio is expected near [-1, 1] "
                    f"(at most {MAX_FLOAT_PEAK:g})",
                )
            mono = x.mean(axis=1, dtype=np.float32) if info.channels > 1 else x[:, 0]
            if last:
                if total == 0:
                    raise ClientError(400, "empty_audio", f"the {info.format} file contains no audio samples")
                if total / info.sample_rate < self.min_duration_s:
                    raise ClientError(
                        400,
                        "audio_too_short",
                        f"audio is {total / info.sample_rate:.3f} s long; the minimum is {self.min_duration_s:g} s",
                    )
            out = mono if same_rate else rs.resample_chunk(np.ascontiguousarray(mono), last=last)
            if last:
                self.decoded_s = total / info.sample_rate
            if out.size:
                yield np.ascontiguousarray(out, dtype=np.float32)
            if last:
                return

    def read(self) -> npt.NDArray[np.float32]:
        """The whole recording (for inputs short enough to run in one piece)."""
        parts = list(self.blocks())
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_audio(path: str | Path, target_rate: int) -> tuple[npt.NDArray[np.float32], AudioInfo]:
    """A whole audio file from disk, as the service would decode it (offline tools, tests)."""
    with open(path, "rb") as f:
        src = AudioSource(f, target_rate, max_duration_s=math.inf, min_duration_s=0.0)
        try:
            return src.read(), src.info
        finally:
            src.close()
