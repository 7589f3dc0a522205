"""Entry point: ``python -m service [--host H] [--port P] [...]``.

Every option falls back to its ASR_* environment variable (see service.config.Settings), so
the same settings work from the command line, the environment, or a container's ``-e`` flags.
"""

from __future__ import annotations

import argparse
import logging
import math
import socket
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from service.app import create_app
from service.config import Settings
from service.drain import drain
from service.engine import limit_malloc_arenas
from service.logs import configure as configure_logging
from service.routes.deps import ServiceState


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: readiness answers 503 "draining" from the moment SIGTERM arrives,
    and the shutdown drains as ``service.drain`` describes before uvicorn's own."""

    def _state(self) -> ServiceState | None:
        return getattr(getattr(self.config.app, "state", None), "service", None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._state()
        if state is not None and not state.draining:
            state.draining = True
            logging.getLogger("service").info("signal %d: draining, then exiting", sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self._state()
        if state is not None and not self.force_exit:  # a second signal skips the drain
            await drain(self, state, sockets)
        await super().shutdown(sockets)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", help="interface to listen on (ASR_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (ASR_PORT, default 8000)")
    p.add_argument("--model-dir", type=Path, help="directory of model packages (ASR_MODEL_DIR)")
    p.add_argument("--tokens-dir", type=Path, help="directory of token maps (ASR_TOKENS_DIR)")
    p.add_argument("--default-model", help="package to serve (ASR_DEFAULT_MODEL)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="execution provider (ASR_DEVICE)")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error", "critical"], help="log level (ASR_LOG_LEVEL)"
    )
    p.add_argument("--log-format", choices=["json", "text"], help="json lines or plain text (ASR_LOG_FORMAT)")
    args = p.parse_args(argv)
    limit_malloc_arenas()  # before any thread starts
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # SIGTERM/SIGINT: uvicorn stops accepting, lets in-flight requests finish for at most
        # this long, then runs the app's shutdown (queued jobs are refused, threads joined).
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        http=settings.http,
        loop=settings.loop,
        access_log=False,  # service.app logs one structured line per request instead
        log_config=None,  # keep the handlers configure_logging installed
    )
    DrainingServer(config).run()


if __name__ == "__main__":
    main()
