"""Several models in one server: pick by name or language, load on first use, unload the least
recently used idle model past the memory budget, never one that is serving; per-model health
and stats."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.server import running_server
from tests.conftest import NemoModel, build_nemo_model, speech_files
from tests.test_api import assert_error, post


@pytest.fixture(scope="module")
def char_model(speech_dir: Path) -> NemoModel:
    return build_nemo_model("char", speech_files(speech_dir))


@pytest.fixture(scope="module")
def models_dir(conformer: NemoModel, char_model: NemoModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three packages: the conformer (en), the char model (en), and the conformer again as 'hi'."""
    root = tmp_path_factory.mktemp("many")
    for m in (conformer, char_model):
        shutil.copytree(m.model_dir / m.name, root / "models" / m.name)
        shutil.copytree(m.tokens_dir, root / "tokens", dirs_exist_ok=True)
    hi = root / "models" / "test_conformer_hi"
    shutil.copytree(root / "models" / conformer.name, hi)
    meta = json.loads((hi / "model.json").read_text())
    meta["language"] = "hi"
    (hi / "model.json").write_text(json.dumps(meta))
    return root


def env(root: Path, **extra: str) -> dict[str, str]:
    return {
        "ASR_MODEL_DIR": str(root / "models"),
        "ASR_TOKENS_DIR": str(root / "tokens"),
        "ASR_DEFAULT_MODEL": "test_conformer",
        **extra,
    }


@pytest.fixture(scope="module")
def one_at_a_time(models_dir: Path) -> Iterator[str]:
    """A budget of 1 MB: any model fits alone, no two together. Jobs wait 2 s for company."""
    e = env(models_dir, ASR_MODELS_MEMORY_MB="1", ASR_MAX_BATCH_SIZE="4", ASR_MAX_QUEUE_DELAY_MS="2000")
    with running_server(e) as url:
        yield url


def statuses(url: str) -> dict[str, str]:
    return {n: m["status"] for n, m in httpx.get(f"{url}/health").json()["models"].items()}


def test_pick_by_name_and_language_with_lru_unloading(
    one_at_a_time: str, conformer: NemoModel, char_model: NemoModel
) -> None:
    url = one_at_a_time
    assert statuses(url) == {"test_char": "unloaded", "test_conformer": "ready", "test_conformer_hi": "unloaded"}
    wav = conformer.files[0].read_bytes()
    r = post(url, wav, model="test_char")  # loads on first use; the idle default makes room
    assert r.status_code == 200 and r.json()["text"] == char_model.transcripts[0] and r.json()["model"] == "test_char"
    assert statuses(url)["test_char"] == "ready" and statuses(url)["test_conformer"] == "unloaded"
    r = post(url, wav, language="hi")
    assert r.status_code == 200 and r.json()["model"] == "test_conformer_hi", r.text
    assert r.json()["text"] == conformer.transcripts[0] and r.json()["language"] == "hi"
    r = post(url, wav)  # the default comes back
    assert r.status_code == 200 and r.json()["model"] == "test_conformer"
    assert statuses(url) == {"test_char": "unloaded", "test_conformer": "ready", "test_conformer_hi": "unloaded"}
    assert_error(post(url, wav, language="fr"), 400, "unsupported_language")
    assert_error(post(url, wav, model="nope"), 404, "model_not_found")
    stats = httpx.get(f"{url}/stats").json()
    assert stats["models"]["test_char"]["requests"]["ok"] == 1
    assert stats["models"]["test_conformer_hi"]["requests"]["ok"] == 1
    assert stats["models_memory_mb"]["budget"] == 1
    ids = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert (
        set(ids) == {"test_char", "test_conformer", "test_conformer_hi"}
        and ids["test_conformer_hi"]["language"] == "hi"
    )


def test_a_model_in_use_is_not_unloaded(one_at_a_time: str, conformer: NemoModel) -> None:
    """While the default serves a request (waiting 2 s for company), another model cannot evict it."""
    url = one_at_a_time
    wav = conformer.files[1].read_bytes()
    post(url, wav)  # the default is loaded
    results: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: results.update(a=post(url, wav)))
    slow.start()
    time.sleep(0.5)
    r = post(url, wav, model="test_char")
    slow.join()
    assert results["a"].status_code == 200 and results["a"].json()["text"] == conformer.transcripts[1]
    assert_error(r, 503, "memory_budget")
    assert "test_conformer" in r.json()["error"]["message"] and r.headers.get("retry-after")


def test_preload_and_unknown_default(models_dir: Path) -> None:
    with running_server(env(models_dir, ASR_PRELOAD_MODELS="*")) as url:
        assert set(statuses(url).values()) == {"ready"}
    with running_server(env(models_dir, ASR_DEFAULT_MODEL="missing"), wait_ready=False) as url:
        deadline = time.monotonic() + 20
        while (h := httpx.get(f"{url}/health")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert h.status_code == 503 and h.json()["status"] == "failed" and "missing" in h.json()["reason"]
        assert statuses(url)["test_char"] == "unloaded"  # the others still load on demand
