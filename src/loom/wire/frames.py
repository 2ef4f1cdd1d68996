"""Length-prefixed binary frames.

A frame is a fixed 7-byte header followed by the payload:

    magic (1 byte, 0x4C 'L') | version (1 byte) | flags (1 byte) | length (4 bytes, big-endian)

Rules of this module:
- pure: no asyncio, socket, os or time; it is used by sans-IO code;
- a payload is at most `frame_bytes_max` (default `FRAME_BYTES_MAX`, 4 MiB); larger ones
  are refused on both sides with `FrameTooLarge`, before any payload byte is buffered;
- an unknown magic, version or flag bit is `BadFrame`. A byte stream cannot be resynced
  after a bad header, so a `FrameDecoder` that raised stays broken: close the connection;
- `FrameDecoder` never holds more than one frame's header plus one max-size payload.
"""

from __future__ import annotations

import struct
from typing import Final

from loom.core.errors import InvalidArgument

MAGIC: Final = 0x4C
VERSION: Final = 1
# No flag is defined in version 1; a reader refuses unknown bits rather than misread
# a payload (e.g. a future compressed one).
FLAGS_KNOWN: Final = 0x00
FRAME_BYTES_MAX: Final = 4 * 1024 * 1024
_HEADER: Final = struct.Struct(">BBBI")
HEADER_BYTES: Final = _HEADER.size


class FrameError(InvalidArgument):
    """The byte stream does not hold valid loom frames; the connection must be closed."""


class FrameTooLarge(FrameError):
    """A payload is over the frame size limit."""


class BadFrame(FrameError):
    """A header has the wrong magic, an unknown version or unknown flags."""


def encode_frame(
    payload: bytes, *, flags: int = 0, frame_bytes_max: int = FRAME_BYTES_MAX
) -> bytes:
    """Return header + payload; `FrameTooLarge` if the payload is over `frame_bytes_max`."""
    if len(payload) > frame_bytes_max:
        raise FrameTooLarge(f"payload of {len(payload)} bytes is over {frame_bytes_max}")
    if flags & ~FLAGS_KNOWN:
        raise BadFrame(f"unknown frame flags {flags:#04x}")
    return _HEADER.pack(MAGIC, VERSION, flags, len(payload)) + payload


def _parse_header(header: bytes | bytearray | memoryview, frame_bytes_max: int) -> int:
    magic, version, flags, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise BadFrame(f"bad frame magic {magic:#04x}")
    if version != VERSION:
        raise BadFrame(f"unknown frame version {version}")
    if flags & ~FLAGS_KNOWN:
        raise BadFrame(f"unknown frame flags {flags:#04x}")
    if length > frame_bytes_max:
        raise FrameTooLarge(f"frame of {length} bytes is over {frame_bytes_max}")
    length_checked: int = length
    return length_checked


class FrameDecoder:
    """Incremental decoder: `feed(bytes)` returns the payloads completed by those bytes."""

    __slots__ = ("_buffer", "_frame_bytes_max", "_is_broken", "_payload_bytes")

    def __init__(self, *, frame_bytes_max: int = FRAME_BYTES_MAX) -> None:
        assert frame_bytes_max > 0
        self._frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()
        # Length of the payload being collected; None while collecting a header.
        self._payload_bytes: int | None = None
        self._is_broken = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an incomplete header or payload."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._is_broken:
            raise BadFrame("decoder already rejected a frame; the stream cannot be resynced")
        try:
            return self._feed(memoryview(data))
        except FrameError:
            self._is_broken = True
            self._buffer.clear()
            raise

    def _feed(self, view: memoryview) -> list[bytes]:
        payloads: list[bytes] = []
        offset = 0
        end = len(view)
        buffer = self._buffer
        while offset < end:
            if self._payload_bytes is None:
                if not buffer and end - offset >= HEADER_BYTES:
                    # Fast path: a whole header in the input, no copy.
                    header_end = offset + HEADER_BYTES
                    self._payload_bytes = _parse_header(
                        view[offset:header_end], self._frame_bytes_max
                    )
                    offset = header_end
                else:
                    take = min(HEADER_BYTES - len(buffer), end - offset)
                    buffer += view[offset : offset + take]
                    offset += take
                    if len(buffer) < HEADER_BYTES:
                        break
                    self._payload_bytes = _parse_header(buffer, self._frame_bytes_max)
                    buffer.clear()
            wanted = self._payload_bytes
            if not buffer and end - offset >= wanted:
                # Fast path: a whole payload in the input, one copy.
                payloads.append(bytes(view[offset : offset + wanted]))
                offset += wanted
                self._payload_bytes = None
                continue
            take = min(wanted - len(buffer), end - offset)
            buffer += view[offset : offset + take]
            offset += take
            if len(buffer) == wanted:
                payloads.append(bytes(buffer))
                buffer.clear()
                self._payload_bytes = None
        assert len(buffer) <= max(HEADER_BYTES, self._frame_bytes_max)
        return payloads
