"""Live audio as clients send it -> float32 at the model's rate, block by block.

PCM16 little-endian at any rate from 8 to 48 kHz (OpenAI Realtime sends 24 kHz; Wyoming
clients, 16 kHz), and G.711 mu-law / A-law at 8 kHz (OpenAI's ``audio/pcmu`` and
``audio/pcma``, telephony). Resampling is streamed (``soxr.ResampleStream``), so block
boundaries leave no seams.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import soxr

Encoding = Literal["pcm16", "ulaw", "alaw"]
MIN_RATE, MAX_RATE = 8000, 48000


def _g711_tables() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """ITU-T G.711 decoding tables (as Python's old audioop.ulaw2lin / alaw2lin), scaled to [-1, 1)."""
    b = np.arange(256, dtype=np.int32)
    u = ~b & 0xFF
    mag = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    ulaw = np.where(u & 0x80, 0x84 - mag, mag - 0x84)
    a = b ^ 0x55
    e, m = (a >> 4) & 7, a & 0x0F
    amag = np.where(e == 0, (m << 4) + 8, ((m << 4) + 0x108) << np.maximum(e - 1, 0))
    alaw = np.where(a & 0x80, amag, -amag)
    return (ulaw / 32768.0).astype(np.float32), (alaw / 32768.0).astype(np.float32)


ULAW, ALAW = _g711_tables()


class AudioFormatError(ValueError):
    """Audio bytes that do not fit the session's format."""


class LiveAudio:
    """One session's input format and resampler state."""

    def __init__(self, encoding: Encoding, rate: int, model_rate: int):
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioFormatError(f"sample rate {rate} Hz is not supported ({MIN_RATE}-{MAX_RATE} Hz)")
        self.encoding, self.rate, self.model_rate = encoding, rate, model_rate
        self._resample = soxr.ResampleStream(rate, model_rate, 1, dtype="float32") if rate != model_rate else None

    def decode(self, data: bytes) -> npt.NDArray[np.float32]:
        if self.encoding == "pcm16":
            if len(data) % 2:
                raise AudioFormatError("PCM16 audio must have an even number of bytes (2 per sample)")
            x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        else:
            x = (ULAW if self.encoding == "ulaw" else ALAW)[np.frombuffer(data, np.uint8)]
        if self._resample is None:
            return x
        return np.asarray(self._resample.resample_chunk(x), dtype=np.float32)
