"""The frame resampler: whole frames in and out, a tone survives 8k -> 24k -> 8k, small delay, no aliasing."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from app.pipecat.audio import FrameResampler, float_to_pcm16, pcm16_mono
from tests.pipecat.reference_resampler import ReferenceResampler


def tone(freq: float, seconds: float, rate: int, level: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return level * 32767 * np.sin(2 * np.pi * freq * t)


def in_frames(resampler: FrameResampler, x: np.ndarray, frame: int) -> list[np.ndarray]:
    return [resampler.process(x[i : i + frame]) for i in range(0, len(x), frame)]


def rms_db(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x))))


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak = int(np.argmax(spectrum))
    # Parabolic interpolation around the peak bin for sub-bin precision.
    a, b, c = np.log(spectrum[peak - 1 : peak + 2] + 1e-12)
    return (peak + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(x)


def delay_samples(out: np.ndarray, ref: np.ndarray, max_lag: int) -> int:
    n = len(ref) - max_lag
    return max(range(max_lag), key=lambda lag: float(np.dot(out[lag : lag + n], ref[:n])))


def test_whole_frames_in_give_whole_frames_out() -> None:
    up, down = FrameResampler(8000, 24000), FrameResampler(24000, 8000)
    assert [len(up.process(np.zeros(160))) for _ in range(5)] == [480] * 5  # 20 ms at 8 kHz -> 24 kHz
    assert [len(down.process(np.zeros(1920))) for _ in range(5)] == [640] * 5  # 80 ms at 24 kHz -> 8 kHz
    other = FrameResampler(44100, 24000)
    assert sum(len(other.process(np.zeros(441))) for _ in range(100)) == 24000  # fractional ratio: no drift


def test_a_1khz_tone_survives_the_round_trip_with_its_frequency_and_level() -> None:
    x = tone(1000, 1.0, 8000)
    up, down = FrameResampler(8000, 24000), FrameResampler(24000, 8000)
    wide = np.concatenate(in_frames(up, x, 160))  # [24000]
    assert len(wide) == 24000
    assert dominant_hz(wide[2400:], 24000) == pytest.approx(1000, abs=1)
    assert rms_db(wide[2400:]) == pytest.approx(rms_db(x[800:]), abs=0.1)
    back = np.concatenate(in_frames(down, wide, 1920))  # [8000]
    assert len(back) == 8000
    assert dominant_hz(back[800:], 8000) == pytest.approx(1000, abs=1)
    assert rms_db(back[800:]) == pytest.approx(rms_db(x[800:]), abs=0.1)


def test_round_trip_delay_is_small_and_as_documented() -> None:
    rng = np.random.default_rng(0)
    spectrum = np.fft.rfft(rng.standard_normal(16000) * 3000)
    spectrum[np.fft.rfftfreq(16000, 1 / 8000) > 3300] = 0  # telephone-band noise
    x = np.fft.irfft(spectrum)
    up, down = FrameResampler(8000, 24000), FrameResampler(24000, 8000)
    back = np.concatenate(in_frames(down, np.concatenate(in_frames(up, x, 160)), 1920))
    lag = delay_samples(back, x, max_lag=160)
    assert lag / 8000 < 0.010  # well below 10 ms
    assert lag / 8000 == pytest.approx(up.delay_s + down.delay_s, abs=1 / 8000)
    # Delayed by exactly the documented (fractional) delay, the output is a clean copy of the input.
    delay = up.delay_s + down.delay_s
    shifted = np.fft.irfft(spectrum * np.exp(-2j * np.pi * np.fft.rfftfreq(16000, 1 / 8000) * delay), n=16000)
    assert np.corrcoef(back[800:15000], shifted[800:15000])[0, 1] > 0.999


def test_downsampling_keeps_the_telephone_band_and_rejects_what_would_alias() -> None:
    kept = np.concatenate(in_frames(FrameResampler(24000, 8000), tone(3400, 1.0, 24000), 1920))
    assert rms_db(kept[400:]) == pytest.approx(rms_db(tone(3400, 1.0, 24000)), abs=0.5)
    folded = np.concatenate(in_frames(FrameResampler(24000, 8000), tone(6000, 1.0, 24000), 1920))
    assert rms_db(folded[400:]) - rms_db(tone(6000, 1.0, 24000)) < -60


def test_pcm16_helpers() -> None:
    stereo = np.array([[100, 300], [-100, -300]], dtype="<i2").tobytes()
    assert list(pcm16_mono(stereo, 2)) == [200, -200]
    assert np.frombuffer(float_to_pcm16(np.array([40000.0, -40000.0, 1.4])), dtype="<i2").tolist() == [32767, -32768, 1]
    with pytest.raises(ValueError):
        FrameResampler(0, 8000)


@pytest.mark.parametrize(
    ("in_rate", "out_rate", "frame"),
    [
        (8000, 24000, 160),  # caller -> model, 20 ms messages
        (24000, 8000, 1920),  # model -> caller, 80 ms frames
        (24000, 24000, 1920),  # the softphone: 1:1
        (8000, 8000, 160),
        (16000, 24000, 320),  # several branches per phase
        (44100, 24000, 441),  # an unusual ratio (L*M = 11 760): the gathered-block path
    ],
)
def test_streaming_output_equals_the_original_implementation(in_rate: int, out_rate: int, frame: int) -> None:
    new, old = FrameResampler(in_rate, out_rate), ReferenceResampler(in_rate, out_rate)
    assert (new.in_rate, new.out_rate, new.delay_s) == (old.in_rate, old.out_rate, old.delay_s)
    rng = np.random.default_rng(in_rate + out_rate)
    sizes = [frame] * 5 + list(rng.integers(0, 3 * frame, 200)) + [0, 1, 2, 7 * frame + 3]  # random chunking
    total = 0
    for n in sizes:
        x = rng.standard_normal(int(n)) * 8000
        assert new.output_length(len(x)) == old.output_length(len(x))
        y, reference = new.process(x), old.process(x)
        assert y.dtype == np.float64 and len(y) == len(reference)
        np.testing.assert_allclose(y, reference, rtol=0, atol=1e-9)
        total += len(y)
    assert total > 0
    pcm = (rng.standard_normal(frame) * 8000).astype("<i2").tobytes()  # and through the PCM16 API
    assert new.process_pcm16(pcm) == float_to_pcm16(old.process(np.frombuffer(pcm, dtype="<i2")))


def test_a_huge_frame_costs_memory_in_proportion_to_the_frame_not_to_frame_times_taps() -> None:
    x = np.zeros(80_000)  # 10 s at 8 kHz in one call (the original built [240000, 49] index arrays)
    up, down = FrameResampler(8000, 24000), FrameResampler(24000, 8000)
    tracemalloc.start()
    try:
        wide = up.process(x)
        narrow = down.process(wide)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(wide) == 240_000 and len(narrow) == 80_000
    assert peak < 8 * wide.nbytes  # 15 MB (it takes ~9 MB); the original peaked at ~290 MB
