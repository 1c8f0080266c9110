"""A small buffered reader over any binary stream, with peek and unread.

LZ4 frames are self-delimiting only once decompressed, so the decoder feeds
them more bytes than they need and hands the excess back with unread().
"""

from __future__ import annotations

from typing import Protocol

from ltx.errors import TruncatedError

_CHUNK = 64 * 1024


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class SeekableReadable(Readable, Protocol):
    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class Reader:
    def __init__(self, f: Readable, path: str | None = None) -> None:
        self._f = f
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of self._buf[0]
        self.path = path

    def tell(self) -> int:
        return self._base + self._pos

    def _fill(self, n: int) -> int:
        """Buffer at least n unread bytes if the stream has them; return what is buffered."""
        avail = len(self._buf) - self._pos
        while avail < n:
            chunk = self._f.read(max(_CHUNK, n - avail))
            if not chunk:
                break
            self._base += self._pos
            self._buf = self._buf[self._pos :] + chunk
            self._pos = 0
            avail = len(self._buf)
        return avail

    def read_exact(self, n: int, field: str) -> bytes:
        pos = self._pos
        if len(self._buf) - pos < n:
            if self._fill(n) < n:
                got = len(self._buf) - self._pos
                raise TruncatedError(
                    f"unexpected end of file at offset {self.tell() + got}: "
                    f"wanted {n} bytes, got {got}",
                    path=self.path,
                    field=field,
                )
            pos = self._pos
        self._pos = pos + n
        return self._buf[pos : pos + n]

    def peek(self, n: int) -> bytes:
        """Up to n bytes without consuming them (fewer only at end of stream)."""
        self._fill(n)
        return self._buf[self._pos : self._pos + n]

    def read_some(self, limit: int) -> bytes:
        """Between 1 and limit bytes; b'' only at end of stream."""
        if self._pos >= len(self._buf) and self._fill(1) == 0:
            return b""
        pos = self._pos
        data = self._buf[pos : pos + limit]
        self._pos = pos + len(data)
        return data

    def unread(self, n: int) -> None:
        """Give back the last n bytes returned (they are still in the buffer)."""
        if n > self._pos:
            raise ValueError("cannot unread more than was read from the buffer")
        self._pos -= n

    def at_eof(self) -> bool:
        return self._fill(1) == 0
