"""Real audio for the CLI and demo: a WAV file encoded as 20 ms Opus packets, and decoded back."""

from __future__ import annotations

import wave
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz: one Opus packet per frame
FRAME_MS = 20


def synth_speechlike(path: Path, seconds: float = 4.0) -> Path:
    """Writes a mono 48 kHz WAV of voiced, pitch-gliding syllables (a stand-in for a recording)."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)  # a voice-like glide around 140 Hz
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))  # harmonics, like a glottal source
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 3.5 * t)) ** 2 / 4  # ~4 syllables a second
    signal = 0.25 * voice * syllables
    write_wav(path, (signal / np.max(np.abs(signal)) * 0.6 * 32767).astype(np.int16))
    return path


def write_wav(path: Path, pcm: np.ndarray) -> None:
    """Writes mono 16-bit PCM at 48 kHz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.astype("<i2").tobytes())


def read_wav(path: Path) -> np.ndarray:
    """Mono 16-bit PCM at 48 kHz from any WAV/audio file PyAV can read (resampled as needed)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise ValueError(f"{path} holds no audio")
    return np.concatenate(chunks).astype(np.int16)


def encode_opus(pcm: np.ndarray, bitrate: int = 32_000) -> list[bytes]:
    """20 ms Opus packets for mono 48 kHz PCM (the tail is padded with silence)."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = SAMPLE_RATE
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.bit_rate = bitrate
    encoder.open()
    pad = (-len(pcm)) % FRAME_SAMPLES
    samples = np.concatenate([pcm, np.zeros(pad, np.int16)]).astype(np.int16)
    packets: list[bytes] = []
    for start in range(0, len(samples), FRAME_SAMPLES):
        frame = av.AudioFrame.from_ndarray(
            samples[start : start + FRAME_SAMPLES].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = SAMPLE_RATE
        packets.extend(bytes(p) for p in encoder.encode(frame))
    packets.extend(bytes(p) for p in encoder.encode(None))
    return packets


class OpusDecoder:
    """Decodes a stream of Opus packets to mono 16-bit PCM."""

    def __init__(self) -> None:
        self._decoder = av.CodecContext.create("libopus", "r")
        self._decoder.sample_rate = SAMPLE_RATE
        self._decoder.layout = "mono"

    def decode(self, packets: Iterable[bytes]) -> np.ndarray:
        """PCM for the packets, in order."""
        out = []
        for packet in packets:
            for frame in self._decoder.decode(av.Packet(packet)):
                pcm = frame.to_ndarray().reshape(-1)
                if pcm.dtype != np.int16:
                    pcm = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
                out.append(pcm)
        return np.concatenate(out) if out else np.zeros(0, np.int16)


def mix(tracks: list[np.ndarray]) -> np.ndarray:
    """Sums speakers' PCM tracks (aligned at their starts), clipped to 16 bits."""
    if not tracks:
        return np.zeros(0, np.int16)
    total = np.zeros(max(len(t) for t in tracks), np.int32)
    for track in tracks:
        total[: len(track)] += track
    return np.clip(total, -32768, 32767).astype(np.int16)
