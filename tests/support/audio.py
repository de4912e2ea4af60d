"""A small WAV file for the audio routes' tests (silence: the simulator reads only its
duration from the header)."""

from __future__ import annotations

import io
import wave


def wav(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return buf.getvalue()
