"""Errors raised by the model package."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, incomplete, or holds a tensor of the wrong shape."""
