"""Rolling restart of the Compose set-up under load, on Docker: what is lost (nothing, it should be).

    eval "$(../shared/tools/local-docker.sh env)"     # or any Docker host with compose
    .venv/bin/python -m bench.rolling_restart [--replicas 3] [--control]

Builds the image (unless ``--no-build``), starts ``deploy/compose`` (HAProxy + N replicas) as
project ``asr-rolling`` on ports 18000/18404, and runs HTTP clients and live sessions through
HAProxy (``testkit.rolling``) while ``docker restart`` restarts each replica in turn, waiting for
HAProxy to see it up again before the next. Prints and saves (``bench/results/rolling_restart.json``)
the counts: failed requests, streams without their final transcript, and the image's size.
``--control`` runs the same with no time to drain (``ASR_DRAIN_DELAY_S=0``,
``ASR_SHUTDOWN_TIMEOUT_S=0``), to show what the counts look like when something is lost.

Without a registry (this project's machine) HAProxy's image is a local stand-in
(``bench/docker/haproxy-standin.Dockerfile``, Debian's HAProxy 2.6) unless ``HAPROXY_IMAGE`` names
one that exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import soundfile as sf

from bench.common import RESULTS
from testkit.nemo import ROOT
from testkit.rolling import HAProxyStats, run_under_load
from testkit.speech import SENTENCES, synthesize

COMPOSE_FILE = ROOT / "deploy" / "compose" / "compose.yaml"
PROJECT = "asr-rolling"
PORT, STATS_PORT = 18000, 18404
IMAGE = "nemo-ctc-asr"
Restart = Callable[[], Awaitable[None]]


def sh(*cmd: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout


def compose_cmd() -> list[str]:
    """``docker compose`` (v2) where it exists, else ``docker-compose`` (v1, Debian 12's)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")


def image_bytes(ref: str) -> int:
    return int(sh("docker", "image", "inspect", "-f", "{{.Size}}", ref).strip())


def haproxy_image() -> str:
    wanted = os.environ.get("HAPROXY_IMAGE", "haproxy:3.2")
    if subprocess.run(["docker", "image", "inspect", wanted], capture_output=True).returncode == 0:
        return wanted
    if subprocess.run(["docker", "pull", wanted], capture_output=True).returncode == 0:
        return wanted
    print(f"{wanted} cannot be pulled: building the local stand-in haproxy:standin", flush=True)
    sh("docker", "build", "--network=host", "-q", "-t", "haproxy:standin",
       "-f", str(ROOT / "bench/docker/haproxy-standin.Dockerfile"), str(ROOT / "bench/docker"))  # fmt: skip
    return "haproxy:standin"


def replica_env(args: argparse.Namespace) -> dict[str, str]:
    """The Compose file's variables for this run (ports apart from a running set-up's)."""
    env = {
        **os.environ,
        "ASR_IMAGE": IMAGE,
        "HAPROXY_IMAGE": haproxy_image(),
        "ASR_REPLICAS": str(args.replicas),
        "ASR_INTRA_OP_THREADS": args.threads,
        "ASR_PORT": str(PORT),
        "ASR_STATS_PORT": str(STATS_PORT),
    }
    if args.control:
        env |= {"ASR_DRAIN_DELAY_S": "0", "ASR_SHUTDOWN_TIMEOUT_S": "0"}
    return env


def restart(cid: str, stats: HAProxyStats, replicas: int, timeline: list[dict[str, Any]]) -> Restart:
    """``docker restart`` one replica, then wait until HAProxy has all of them in rotation again."""

    async def go() -> None:
        name = sh("docker", "inspect", "-f", "{{.Name}}", cid).strip("/\n")
        t = time.monotonic()
        await asyncio.to_thread(sh, "docker", "restart", "-t", "45", cid)
        stopped = time.monotonic() - t
        await asyncio.to_thread(stats.wait, lambda up: len(up) == replicas, 300)
        back = time.monotonic() - t
        timeline.append({"replica": name, "restart_s": round(stopped, 1), "in_rotation_s": round(back, 1)})
        print(f"  {name}: stopped and started in {stopped:.1f} s, in rotation after {back:.1f} s", flush=True)
        await asyncio.sleep(3)

    return go


def image_sizes() -> dict[str, float]:
    base, total = image_bytes("python:3.12-slim"), image_bytes(IMAGE)
    return {
        "image_mb": round(total / 1e6, 1),
        "base_mb": round(base / 1e6, 1),
        "project_layers_mb": round((total - base) / 1e6, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--http-clients", type=int, default=3)
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--threads", default="1", help="ASR_INTRA_OP_THREADS per replica (this machine: 2 cores)")
    p.add_argument("--no-build", action="store_true", help="use the nemo-ctc-asr image as it is")
    p.add_argument("--keep", action="store_true", help="leave the set-up running")
    p.add_argument("--control", action="store_true", help="no time to drain: shows what losses look like")
    args = p.parse_args()

    compose = [*compose_cmd(), "-p", PROJECT, "-f", str(COMPOSE_FILE)]
    if not args.no_build:
        print("building the image ...", flush=True)
        t0 = time.monotonic()
        sh("docker", "build", "--network=host", "-q", "-t", IMAGE, str(ROOT))
        print(f"  built in {time.monotonic() - t0:.0f} s", flush=True)
    env = replica_env(args)
    stats = HAProxyStats(f"http://127.0.0.1:{STATS_PORT}")
    d = ROOT / ".cache" / "bench" / "rolling"
    d.mkdir(parents=True, exist_ok=True)
    wavs = [synthesize(t, "en-us", 150, d / f"s{i}.wav") for i, t in enumerate(SENTENCES[:4])]
    clips = [sf.read(w, dtype="float32")[0] for w in wavs]

    sh(*compose, "down", "--remove-orphans", env=env, check=False)
    try:
        t0 = time.monotonic()
        sh(*compose, "up", "-d", env=env)
        stats.wait(lambda up: len(up) == args.replicas, 300)
        print(f"{args.replicas} replicas up behind HAProxy after {time.monotonic() - t0:.1f} s", flush=True)
        ids = sh(*compose, "ps", "-q", "asr", env=env).split()
        assert len(ids) == args.replicas, ids
        timeline: list[dict[str, Any]] = []
        print(f"load: {args.http_clients} HTTP clients, {args.streams} live sessions; restarts:", flush=True)
        restarts = [restart(c, stats, args.replicas, timeline) for c in ids]
        url = f"http://127.0.0.1:{PORT}"
        tally = asyncio.run(run_under_load(url, clips, restarts, args.http_clients, args.streams, 10.0, 10.0))
        served = {n: int(s["stot"]) for n, s in stats.servers().items() if int(s["stot"])}
    finally:
        if not args.keep:
            sh(*compose, "down", "--remove-orphans", env=env, check=False)

    result = {
        "control": args.control,
        "replicas": args.replicas,
        "haproxy_image": env["HAPROXY_IMAGE"],
        **tally.summary(),
        "restarts": timeline,
        "served_per_haproxy_slot": served,
        **image_sizes(),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("rolling_restart_control.json" if args.control else "rolling_restart.json")
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    streams = tally.streams_ok + tally.streams_ended_early + tally.streams_lost
    print(f"\nfailed requests: {tally.http_failed} of {tally.http_ok + tally.http_failed}; "
          f"streams without their final transcript: {tally.streams_lost} of {streams} "
          f"({tally.streams_ended_early} ended early with it)")  # fmt: skip
    raise SystemExit(1 if tally.http_failed + tally.streams_lost and not args.control else 0)


if __name__ == "__main__":
    main()
