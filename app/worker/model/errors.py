"""Errors raised by the model package, and the one check of a checkpoint's tensor layout."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint file is missing, incomplete, or holds a tensor of the wrong shape."""


def check_layout(sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and wrongly shaped tensor."""
    problems: list[str] = []
    missing = [name for name in expected if name not in sd]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): " + ", ".join(missing))
    unexpected = sorted(name for name in sd if name not in expected)
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): " + ", ".join(unexpected))
    for name, shape in expected.items():
        if name in sd and tuple(sd[name].shape) != tuple(shape):
            problems.append(f"tensor '{name}' has shape {tuple(sd[name].shape)}, expected {tuple(shape)}")
    if problems:
        raise CheckpointError(f"{what} does not match the expected layout:\n  " + "\n  ".join(problems))
