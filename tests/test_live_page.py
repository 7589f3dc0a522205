"""The /live page in a real browser: headless Chromium whose fake microphone plays a WAV file.

Chromium's flags ``--use-fake-device-for-media-stream --use-file-for-fake-audio-capture=F``
make getUserMedia() play F (in a loop); the page runs its AudioWorklet, streams over the
Realtime WebSocket, and shows each turn. A screenshot is taken and checked (not committed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import jiwer
import numpy as np
import pytest
import soundfile as sf
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from testkit.server import running_server
from testkit.speech import SENTENCES, synthesize

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def mic_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One sentence then 2 s of silence (the page's server VAD ends the turn in the pause)."""
    d = tmp_path_factory.mktemp("mic")
    text = SENTENCES[0]
    x, _ = sf.read(synthesize(text, "en-us", 150, d / "s.wav"), dtype="float32")
    f = d / "mic.wav"
    sf.write(f, np.concatenate([np.zeros(8000, np.float32), x, np.zeros(32000, np.float32)]), 16000, subtype="PCM_16")
    return f, text


@pytest.fixture(scope="module")
def browser(mic_file: tuple[Path, str]) -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromium-driver are not installed (tests/run.sh installs them with apt-get)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_file[0]}",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1000,700",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_microphone_to_words_on_the_page(browser: webdriver.Chrome, mic_file: tuple[Path, str], tmp_path: Path) -> None:
    _, text = mic_file
    with running_server({}) as url:
        browser.get(f"{url}/live")
        browser.find_element(By.ID, "mic").click()
        done = WebDriverWait(browser, 60).until(
            lambda d: [p for p in d.find_elements(By.CSS_SELECTOR, "#turns p[data-done]") if p.text.strip()]
        )
        heard = done[0].text.strip()
        shot = Path(os.environ.get("ASR_SCREENSHOT_DIR", tmp_path)) / "live.png"
        browser.save_screenshot(str(shot))
        browser.find_element(By.ID, "mic").click()  # stop
        stats = httpx.get(f"{url}/stats").json()["live"]
    assert jiwer.wer(text.lower(), heard) < 0.35, heard
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert stats["sessions"].get("refused", 0) == 0


def test_dropped_file_is_transcribed(browser: webdriver.Chrome, mic_file: tuple[Path, str]) -> None:
    f, _ = mic_file
    with running_server({}) as url:
        expected = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": f.read_bytes()}).json()["text"]
        browser.get(f"{url}/live")
        browser.find_element(By.ID, "file").send_keys(str(f))
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "filetext").text == expected)
