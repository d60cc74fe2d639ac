"""Persona prompt states on disk: computed once per (checkpoint, persona, device), loaded at start after.

A persona's prompt state (`SlotState` after the whole persona prompt; see `model/prompts.py`) is a pure
function of the LM weights, the numerics of the code that runs the prefill (`MODEL_CODE_VERSION`),
the tokenised role prompt, the voice prompt, the dtypes and the device kind. `state_key` hashes all of
them (an edit of the code that changes no number, a docstring say, keeps every cached state); the state is kept as one safetensors
file per key under the cache directory (normally WORKER_STATE_DIR/persona-cache/):

    <persona id>.<key[:32]>.safetensors   tensors offset [] long, cache [17, CT] long,
                                          provided [17, CT] bool, kv [L, 2, H, n, Dh] (KV dtype);
                                          metadata: format, key, persona, sha256 of the tensor
                                          bytes, and a JSON `info` object

A hit loads the file instead of running the prefill; a miss runs it and writes the file atomically
(temporary file in the same directory, fsync, rename), so a reader never sees half a file. A file that
cannot be read or does not match what the key promises is logged, recomputed and overwritten.
Old entries (other keys) are left in place: they are small next to the weights and a worker sharing
the directory may still use them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from app.worker.model import MODEL_CODE_VERSION, prompts
from app.worker.model.lm import LMConfig
from app.worker.model.lm_state import SlotState

logger = logging.getLogger(__name__)

FORMAT = "personaplex-persona-state/1"
CACHE_DIRNAME = "persona-cache"
_SAMPLE_BYTES = 1 << 20  # bytes of tensor data hashed at each end of the LM file
_STATE_TENSORS = ("offset", "cache", "provided", "kv")


class CorruptEntry(ValueError):
    """A cache file that cannot be read or does not hold what its key promises."""


# ------------------------------------------------------------------------------------- keys
def checkpoint_identity(path: Path) -> str:
    """Identity of an LM safetensors file without reading all of it (the full file is 16 GB).

    Hashes the file's size and mtime, its safetensors header (names, dtypes, shapes, offsets) and
    the first and last MiB of tensor data: a rewritten or replaced file changes at least one.
    """
    st = path.stat()
    digest = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        header_len = int.from_bytes(head, "little")
        if header_len > st.st_size - 8:
            raise ValueError(f"{path}: safetensors header length {header_len} exceeds the file")
        digest.update(f.read(header_len))
        data_start = 8 + header_len
        digest.update(f.read(_SAMPLE_BYTES))
        f.seek(max(data_start, st.st_size - _SAMPLE_BYTES))
        digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _tensor_digest(digest: hashlib._Hash, t: torch.Tensor) -> None:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())


def voice_digest(voice: prompts.Voice | None) -> str:
    """Hash of the voice prompt as the prefill sees it (embeddings + cache, or Mimi codes of a .wav)."""
    digest = hashlib.sha256()
    if isinstance(voice, prompts.VoiceEmbeddings):
        digest.update(b"embeddings")
        _tensor_digest(digest, voice.embeddings)
        _tensor_digest(digest, voice.cache)
    elif isinstance(voice, prompts.VoiceCodes):
        digest.update(b"codes")
        _tensor_digest(digest, voice.codes)
    else:
        digest.update(b"none")
    return digest.hexdigest()


def device_identity(device: torch.device) -> str:
    """The device kind the prefill ran on (kernels differ in the last bits between kinds)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _state_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in _STATE_TENSORS:
        _tensor_digest(digest, tensors[name])
    return digest.hexdigest()


def state_key(
    *,
    checkpoint: str,
    cfg: LMConfig,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    device: torch.device,
    role_tokens: list[int],
    voice: prompts.Voice | None,
) -> str:
    """The cache key of one persona's prompt state (hex sha256)."""
    parts = {
        "format": FORMAT,
        "checkpoint": checkpoint,
        "config": asdict(cfg),
        "dtype": str(dtype),
        "kv_dtype": str(kv_dtype),
        "device": device_identity(device),
        "torch": torch.__version__,
        "model_code": MODEL_CODE_VERSION,
        "role_tokens": [int(t) for t in role_tokens],
        "voice": voice_digest(voice),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------ cache
class PersonaCache:
    """Prompt states of one LM (`cfg`, KV in `kv_dtype`) under `root`; see the module docstring."""

    def __init__(self, root: Path, cfg: LMConfig, kv_dtype: torch.dtype) -> None:
        self.root = root
        self.cfg = cfg
        self.kv_dtype = kv_dtype

    def path(self, persona_id: str, key: str) -> Path:
        return self.root / f"{persona_id}.{key[:32]}.safetensors"

    def load(self, persona_id: str, key: str, device: torch.device) -> SlotState | None:
        """The cached state on `device`, or None when there is none. Raises CorruptEntry."""
        path = self.path(persona_id, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if names != set(_STATE_TENSORS):
                    raise CorruptEntry(f"{path}: holds tensors {sorted(names)}")
                tensors = {name: f.get_tensor(name) for name in _STATE_TENSORS}
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CorruptEntry(f"{path}: not a readable safetensors file: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("key") != key:
            raise CorruptEntry(f"{path}: metadata {meta.get('format')!r}/{meta.get('key')!r} do not match the key")
        if meta.get("sha256") != _state_digest(tensors):
            raise CorruptEntry(f"{path}: tensor data do not match their checksum")
        state = SlotState(**tensors)
        self._check(path, state)
        return state.to(device)

    def store(self, persona_id: str, key: str, state: SlotState, info: dict[str, object] | None = None) -> Path:
        """Write `state` for `key` atomically; returns the file."""
        self._check(Path(f"<state of {persona_id}>"), state)
        path = self.path(persona_id, key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        tensors = {
            "offset": state.offset.detach().to("cpu", torch.long).reshape(()).contiguous(),
            "cache": state.cache.detach().to("cpu", torch.long).contiguous(),
            "provided": state.provided.detach().to("cpu", torch.bool).contiguous(),
            "kv": state.kv.detach().to("cpu", self.kv_dtype).contiguous(),
        }
        meta = {
            "format": FORMAT,
            "key": key,
            "persona": persona_id,
            "sha256": _state_digest(tensors),
            "info": json.dumps(info or {}, sort_keys=True, default=str),
        }
        try:
            save_file(tensors, str(tmp), metadata=meta)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def get_or_compute(
        self,
        persona_id: str,
        key: str,
        device: torch.device,
        compute: Callable[[], SlotState],
        info: dict[str, object] | None = None,
    ) -> tuple[SlotState, bool]:
        """(state, True) from the cache, else (compute(), False) after writing it to the cache."""
        try:
            state = self.load(persona_id, key, device)
        except CorruptEntry as exc:
            logger.warning("persona %s: cached prompt state unusable, computing it again: %s", persona_id, exc)
            state = None
        if state is not None:
            return state, True
        state = compute()
        path = self.store(persona_id, key, state, info)
        logger.info("persona %s: prompt state cached in %s", persona_id, path)
        return state, False

    def _check(self, path: Path, state: SlotState) -> None:
        """The state fits this LM: shapes, dtypes, and a KV window matching its offset."""
        problems = state.problems(self.cfg, self.kv_dtype)
        if problems:
            raise CorruptEntry(f"{path}: {'; '.join(problems)}")
