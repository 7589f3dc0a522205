"""A rolling restart under load behind the real HAProxy, with the Compose set-up's own config.

HAProxy runs ``deploy/compose/haproxy.cfg`` as shipped, except that its Docker DNS server line is
replaced by the two service processes started here (on fixed ports, so a restarted one comes
back where HAProxy looks for it), and the replicas get the drain settings ``compose.yaml`` gives
them. While HTTP clients and live sessions run through HAProxy, each replica in turn gets SIGTERM,
exits, and is started again; the next waits until HAProxy sees it up. Nothing may be lost: every
HTTP answer 200 with its transcript, every live session its final transcript.
(``bench/rolling_restart.py`` does the same with the Compose set-up on Docker.)
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from testkit.nemo import IN_CI
from testkit.rolling import HAProxyStats, run_under_load
from testkit.server import free_port, start_service, stop_service, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose"


def compose_env() -> dict[str, str]:
    """The replicas' settings from compose.yaml (``${VAR:-default}`` resolved to its default)."""
    env = yaml.safe_load((COMPOSE / "compose.yaml").read_text())["services"]["asr"]["environment"]
    out = {}
    for k, v in env.items():
        if v is None:
            continue  # passed through from the host
        m = re.fullmatch(r"\$\{\w+:-(.*)\}", str(v))
        out[k] = m.group(1) if m else str(v)
    return out


def local_haproxy_cfg(front: int, stats: int, replicas: list[int]) -> str:
    cfg = (COMPOSE / "haproxy.cfg").read_text()
    template = re.search(r"^\s*server-template .*$", cfg, re.M)
    assert template, "haproxy.cfg has no server-template line"
    servers = "\n".join(f"    server asr{i + 1} 127.0.0.1:{p}" for i, p in enumerate(replicas))
    cfg = cfg.replace(template.group(0), servers)
    cfg = cfg.replace("bind :8000", f"bind 127.0.0.1:{front}").replace("bind :8404", f"bind 127.0.0.1:{stats}")
    assert f"127.0.0.1:{front}" in cfg and f"127.0.0.1:{stats}" in cfg
    return cfg


class HAProxy:
    def __init__(self, cfg: Path, stats_port: int):
        # Its log to a file: HAProxy blocks on a full pipe, and with it every connection.
        self.log = cfg.with_suffix(".log")
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        self.stats = HAProxyStats(f"http://127.0.0.1:{stats_port}")


@pytest.fixture()
def haproxy_bin() -> Iterator[str]:
    path = shutil.which("haproxy")
    if path is None:
        if IN_CI:
            pytest.fail("haproxy is not installed (tests/run.sh installs it)")
        pytest.skip("haproxy is not installed (tests/run.sh installs it)")
    yield path


def test_rolling_restart_behind_haproxy_loses_nothing(
    haproxy_bin: str, sentences: list[tuple[np.ndarray, str]], tmp_path: Path
) -> None:
    env = {**compose_env(), "ASR_INTRA_OP_THREADS": "1", "ASR_LOG_LEVEL": "info"}
    assert float(env["ASR_DRAIN_DELAY_S"]) > 2  # HAProxy's fall 2 x inter 1s
    ports = [free_port(), free_port()]
    front, stats = free_port(), free_port()
    (tmp_path / "haproxy.cfg").write_text(local_haproxy_cfg(front, stats, ports))
    subprocess.run([haproxy_bin, "-c", "-f", str(tmp_path / "haproxy.cfg")], check=True, capture_output=True)
    procs = [start_service(p, env) for p in ports]
    logs: list[str] = []
    lb = HAProxy(tmp_path / "haproxy.cfg", stats)
    try:
        for p, proc in zip(ports, procs, strict=True):
            wait_until_ready(f"http://127.0.0.1:{p}", proc)
        lb.stats.wait(lambda up: up == ["asr1", "asr2"], 60)

        def restart(i: int) -> Callable[[], Awaitable[None]]:
            async def go() -> None:
                logs.append(await asyncio.to_thread(stop_service, procs[i], 60))
                procs[i] = start_service(ports[i], env)
                await asyncio.to_thread(wait_until_ready, f"http://127.0.0.1:{ports[i]}", procs[i])
                await asyncio.to_thread(lb.stats.wait, lambda up: f"asr{i + 1}" in up, 60)
                await asyncio.sleep(2)

            return go

        clips = [x for x, _ in sentences]
        tally = asyncio.run(run_under_load(f"http://127.0.0.1:{front}", clips, [restart(0), restart(1)]))
        served = {n: int(s["stot"]) for n, s in lb.stats.servers().items()}
    finally:
        for proc in procs:
            logs.append(stop_service(proc))
        lb.proc.terminate()
        lb.proc.wait(10)
        lb_log = lb.log.read_text(errors="replace")
    print(tally.summary(), served)
    assert tally.failures == [], [*tally.failures, lb_log[-3000:]]
    assert tally.http_failed == 0 and tally.streams_lost == 0
    assert tally.streams_ended_early == 0  # with 30 s to drain, every stream ended on its own
    assert tally.http_ok >= 20 and tally.streams_ok >= 4, tally.summary()
    assert all(n > 0 for n in served.values()), served  # both replicas took traffic
    assert sum(tally.streams_open_at_restart) > 0  # live sessions were open when replicas restarted
    assert sum("draining" in log for log in logs) >= 2  # each replica drained
