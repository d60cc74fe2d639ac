"""The browser softphone in a real browser: Debian's Chromium (driven by Playwright with its
executable path, never a downloaded browser), its fake microphone playing espeak-ng speech, calls a
persona on real `callcenter gateway` + `callcenter worker` processes (tiny model) and hangs up.

What the page measures is on `window.softphone` (state, call id, meter and getStats figures); the
screenshots land in test-artifacts/ (gitignored).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.callstate import CallRecord, CallStore
from app.gateway.webrtc import BUSY_MESSAGE
from tests.e2e.conftest import ROOT, Stack, tail

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.netns]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
PERSONA = "waste-management"
PHONE_VIEWPORT = {"width": 390, "height": 844}  # a phone screen
SPEECH = "Hello, I would like to book a bulky item pickup for an old sofa next Saturday, please."


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the fake microphone says: espeak-ng, as a 48 kHz 16-bit mono PCM WAV (Chromium's fake
    capture reads WAV files and loops them)."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox are needed (apt-get install espeak-ng sox)")
    tmp = tmp_path_factory.mktemp("microphone")
    raw, wav = tmp / "espeak.wav", tmp / "microphone-48k.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), SPEECH], check=True, timeout=60)
    subprocess.run(
        ["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", "-e", "signed-integer", str(wav), "pad", "0.5", "1"],
        check=True,
        timeout=60,
    )
    return wav


def chromium_args(wav: Path) -> list[str]:
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--allow-loopback-in-peer-connection",  # media stays on loopback (see tests/netns)
    ]


async def _wait_record(store: CallStore, call_id: str, done: Any, timeout_s: float = 15.0) -> CallRecord | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    record = await store.get_call(call_id)
    while not (record is not None and done(record)) and loop.time() < deadline:
        await asyncio.sleep(0.1)
        record = await store.get_call(call_id)
    return record


async def test_a_browser_calls_a_persona_hears_it_sees_its_text_and_hangs_up_then_busy_lost_no_mic(
    stack: Stack, microphone_wav: Path, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (Debian's package; never `playwright install`)")
    ARTIFACTS.mkdir(exist_ok=True)

    def why() -> str:
        return f"\n--- gateway log ---\n{tail(stack.gateway.log)}\n--- worker log ---\n{tail(stack.worker.log)}"

    store = CallStore(aioredis.from_url(stack.redis_url, decode_responses=True))
    console: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=chromium_args(microphone_wav),
            viewport=PHONE_VIEWPORT,
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
            bypass_csp=True,  # the page's CSP forbids eval, which Playwright's wait_for_function uses
        )
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
            await page.goto(f"{stack.gateway_url}/")
            await page.wait_for_function("window.softphone && window.softphone.state === 'idle'")
            await page.select_option("#persona", PERSONA)
            await page.click("#call")

            # The call goes active: the page says so, and so does the record.
            await page.wait_for_function("window.softphone.state === 'active'", timeout=30_000)
            call_id = await page.evaluate("window.softphone.callId")
            assert call_id, console
            record = await _wait_record(store, call_id, lambda r: r.status == "active")
            assert record is not None and (record.status, record.channel, record.persona) == (
                "active",
                "webrtc",
                PERSONA,
            ), why()
            assert await page.inner_text("#status-text") == "On the line with City Waste Management"

            # Bot audio arrives (Web Audio meter and RTP stats), the model's text streams in, the
            # fake microphone is heard by the meter.
            await page.wait_for_function(
                """() => { const s = window.softphone.stats;
                    return s.botActiveTicks >= 20 && s.packetsReceived >= 100 && s.texts >= 3 && s.micActiveTicks >= 10; }""",
                timeout=30_000,
            )
            stats = await page.evaluate("window.softphone.stats")
            shown = await page.inner_text("#transcript")
            timer = await page.inner_text("#timer")
            await page.screenshot(path=str(ARTIFACTS / "softphone-active.png"), full_page=True)

            await page.click("#call")  # hang up
            await page.wait_for_function("window.softphone.state === 'ended'", timeout=10_000)
            ended_text = await page.inner_text("#status-text")
            length = await page.inner_text("#timer")
            await page.screenshot(path=str(ARTIFACTS / "softphone-ended.png"), full_page=True)
            call_console = list(console)  # the 503 below is logged by the browser, as it should be

            # No free slot: the gateway's busy answer (as tests/gateway/test_webrtc.py checks it) is shown.
            await page.route(
                "**/api/offer",
                lambda route: route.fulfill(status=503, json={"error": "busy", "message": BUSY_MESSAGE}),
            )
            await page.click("#call")
            await page.wait_for_function("window.softphone.state === 'error'", timeout=10_000)
            busy = (await page.evaluate("window.softphone.error"), await page.inner_text("#message"))
            await page.screenshot(path=str(ARTIFACTS / "softphone-busy.png"), full_page=True)
            await page.unroute("**/api/offer")

            # The worker dies mid-call (this module's stack is not used after this test).
            await page.click("#call")
            await page.wait_for_function("window.softphone.state === 'active'", timeout=30_000)
            lost_id = await page.evaluate("window.softphone.callId")
            stack.worker.process.kill()
            await page.wait_for_function("window.softphone.state === 'ended'", timeout=15_000)
            lost = (await page.evaluate("window.softphone.endReason"), await page.inner_text("#message"))
            await page.screenshot(path=str(ARTIFACTS / "softphone-worker-lost.png"), full_page=True)

            # No microphone (refused): said plainly, nothing is sent.
            refused = await browser.new_page()
            await refused.add_init_script(
                "navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('denied', 'NotAllowedError'));"
            )
            await refused.goto(f"{stack.gateway_url}/")
            await refused.wait_for_function("window.softphone && window.softphone.state === 'idle'")
            await refused.click("#call")
            await refused.wait_for_function("window.softphone.state === 'error'", timeout=10_000)
            no_mic = (await refused.evaluate("window.softphone.error"), await refused.inner_text("#message"))
        finally:
            await browser.close()

    record = await _wait_record(store, call_id, lambda r: r.ended_at is not None)
    lost_record = await _wait_record(store, lost_id, lambda r: r.ended_at is not None)
    transcript = await store.transcript(call_id)
    events = await store.events(call_id)
    await store.redis.aclose()

    assert stats["botPeak"] > 0.001 and stats["totalSamplesReceived"] > 48_000, stats
    assert stats["micPeak"] > 0.01, stats
    words = " ".join(shown.split())
    assert words and " ".join(transcript.split()).startswith(words), (shown, transcript)  # the same text
    assert timer != "00:00" and length != "00:00"
    assert ended_text == "Call ended"
    assert busy == ("busy", BUSY_MESSAGE)
    assert lost == ("worker_lost", "The call was lost: the voice engine stopped responding. Please call again.")
    assert lost_record is not None and (lost_record.status, lost_record.end_reason) == ("failed", "worker_lost")
    assert no_mic[0] == "no_microphone" and no_mic[1].startswith("Microphone access was refused"), no_mic
    assert record is not None, why()
    assert (record.status, record.end_reason, record.channel) == ("completed", "caller_hangup", "webrtc"), why()
    assert [e["to"] for e in events if e["type"] == "status"] == ["ringing", "connecting", "active", "completed"]
    assert record.frames_in and record.frames_in >= 25, "the caller's audio did not reach the worker"
    assert record.frames_out and record.frames_out >= 25
    assert not [line for line in call_console if line.startswith(("error", "pageerror"))], call_console
