"""``GET /live``: a page to try live transcription in a browser (microphone) and to drop a file.

Plain HTML and JavaScript, no build step: an AudioWorklet takes the microphone at 16 kHz, sends
PCM16 over the OpenAI Realtime WebSocket (``/v1/realtime``, with provisional text), and shows
each turn as it is spoken; a dropped file goes to ``POST /v1/audio/transcriptions``. With API
keys on, the page asks for one (sent as the ``openai-insecure-api-key.<key>`` WebSocket
subprotocol, as OpenAI's browser clients do, and as a Bearer header on uploads).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PAGE = resources.files("service.live").joinpath("live.html").read_text(encoding="utf-8")


@router.get("/live", include_in_schema=False)
async def live_page() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache"})
