"""Bytes in, mono float32 at the model's rate out: decode, validate, downmix, resample.

Decoding is libsndfile's (through soundfile): WAV (PCM 8/16/24/32-bit, float), FLAC, OGG and
the other containers it reads. Resampling is soxr's (HQ). Every way a file can be wrong ends
in a ``ClientError`` naming the problem, never in an exception the API would turn into a 500.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from service.errors import ClientError

# Float WAVs may exceed +-1 (headroom, or integer-scaled floats up to 2**23); far beyond that the
# float32 power spectrum overflows to inf. Refuse such input instead of returning NaN garbage.
MAX_FLOAT_PEAK = 1e8


@dataclass(frozen=True)
class Audio:
    samples: npt.NDArray[np.float32]  # mono, at ``sample_rate``
    sample_rate: int
    duration_s: float
    source_rate: int
    channels: int
    format: str  # libsndfile's container name, e.g. "WAV"
    subtype: str  # e.g. "PCM_16"


def _check_riff(data: bytes) -> None:
    """Reject a RIFF/WAVE file whose chunks promise more bytes than were sent.

    libsndfile silently shortens a truncated data chunk; a service should say the upload was
    cut off instead of transcribing part of it. Streaming writers that leave the size as 0 or
    0xFFFFFFFF (length unknown) are accepted.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return
    fmt = "<I" if data[:4] == b"RIFF" else ">I"
    pos = 12
    while pos + 8 <= len(data):
        cid = data[pos : pos + 4]
        (size,) = struct.unpack(fmt, data[pos + 4 : pos + 8])
        body = pos + 8
        if cid == b"data":
            if size not in (0, 0xFFFFFFFF) and body + size > len(data):
                raise ClientError(
                    400,
                    "truncated_audio",
                    f"WAV data chunk declares {size} bytes but only {len(data) - body} were received; "
                    "the upload looks cut off",
                )
            return
        pos = body + size + (size & 1)  # chunks are word-aligned
    if pos > len(data) or pos + 8 > len(data):
        raise ClientError(400, "truncated_audio", "WAV file ends before its 'data' chunk; the upload looks cut off")


def load_audio(data: bytes, target_rate: int, max_duration_s: float, min_duration_s: float) -> Audio:
    """Decode ``data`` and return mono float32 samples at ``target_rate``."""
    if not data:
        raise ClientError(400, "empty_file", "the uploaded file is empty")
    _check_riff(data)
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as e:
        msg = str(e).split(": ", 1)[-1]
        if "not recognised" in msg.lower() or "unknown format" in msg.lower():
            raise ClientError(
                415,
                "unsupported_format",
                f"not a recognised audio file (first bytes {data[:8]!r}); send WAV, FLAC or OGG",
            ) from None
        raise ClientError(400, "corrupt_audio", f"the audio file could not be read: {msg}") from None
    with f:
        fmt, subtype, rate, channels, frames = f.format, f.subtype, f.samplerate, f.channels, f.frames
        if rate <= 0 or channels <= 0:
            raise ClientError(400, "corrupt_audio", f"invalid header: {rate} Hz, {channels} channels")
        declared_s = frames / rate
        if declared_s > max_duration_s:
            raise ClientError(
                413, "audio_too_long", f"audio is {declared_s:.1f} s long; the limit is {max_duration_s:g} s"
            )
        try:
            x = f.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise ClientError(400, "corrupt_audio", f"the audio data could not be decoded: {e}") from None
    if x.shape[0] == 0:
        raise ClientError(400, "empty_audio", f"the {fmt} file contains no audio samples")
    if not np.isfinite(x).all():
        raise ClientError(400, "invalid_samples", "the audio contains NaN or infinite sample values")
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > MAX_FLOAT_PEAK:
        raise ClientError(
            400,
            "invalid_samples",
            f"sample values reach {peak:.3g}; float audio is expected near [-1, 1] (at most {MAX_FLOAT_PEAK:g})",
        )
    duration_s = x.shape[0] / rate
    if duration_s < min_duration_s:
        raise ClientError(
            400, "audio_too_short", f"audio is {duration_s:.3f} s long; the minimum is {min_duration_s:g} s"
        )
    mono = x.mean(axis=1, dtype=np.float32) if channels > 1 else x[:, 0]
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="HQ")
    return Audio(
        samples=np.ascontiguousarray(mono, dtype=np.float32),
        sample_rate=target_rate,
        duration_s=duration_s,
        source_rate=rate,
        channels=channels,
        format=fmt,
        subtype=subtype,
    )
