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
