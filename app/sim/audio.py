"""Caller audio in, bot audio out: wav files at the telephone rate (8 kHz mono PCM16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

PHONE_RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz: one Twilio media message
FRAME_MS = 20


def read_caller_audio(path: Path) -> np.ndarray:
    """Any wav soundfile reads (PCM, float, μ-law; any rate; mono or stereo) -> (n,) int16 at 8 kHz."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (n, channels)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read audio: {exc}") from exc
    mono = data.mean(axis=1)  # (n,)
    if rate != PHONE_RATE:
        mono = soxr.resample(mono, rate, PHONE_RATE, quality="HQ")  # (n * 8000 / rate,)
    return float_to_pcm16(mono)


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """(n,) float in [-1, 1] -> (n,) int16, clipped."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def split_frames(pcm: np.ndarray) -> list[np.ndarray]:
    """(n,) int16 -> 20 ms frames of (160,) int16; the last one padded with silence."""
    count = -(-len(pcm) // FRAME_SAMPLES)
    padded = np.zeros(count * FRAME_SAMPLES, dtype=np.int16)
    padded[: len(pcm)] = pcm
    return list(padded.reshape(count, FRAME_SAMPLES))


def frame_dbfs(frame: np.ndarray) -> float:
    """RMS level of a (160,) int16 frame in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(frame.astype(np.float64) ** 2)))
    return 20.0 * np.log10(rms / 32768.0) if rms > 0 else float("-inf")


def write_wav(path: Path, pcm: np.ndarray, rate: int = PHONE_RATE) -> None:
    """Write (n,) int16 as a mono PCM16 wav, creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), pcm, rate, subtype="PCM_16")
