"""The one exception family of the LTX library.

Every failure names the file (when known) and the offending field, so an
operator reading a log line knows which file is bad and why without a debugger.
"""

from __future__ import annotations


class LTXError(Exception):
    """A malformed, truncated or inconsistent LTX file, or a misuse of the encoder."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        self.message = message
        self.path = path
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.field}: {self.message}" if self.field else self.message
        return f"{self.path}: {text}" if self.path else text

    def with_path(self, path: str | None) -> LTXError:
        """Attach the file name once it is known (decoders may not know it)."""
        if path is not None and self.path is None:
            self.path = path
            self.args = (self._render(),)
        return self


class HeaderError(LTXError):
    """The 100-byte header is invalid."""


class PageError(LTXError):
    """A page frame is invalid (order, bounds, size, compression)."""


class PageIndexError(LTXError):
    """The page index of a v2/v3 file disagrees with the page frames."""


class TrailerError(LTXError):
    """The trailer is invalid or the file does not end where it should."""


class ChecksumError(LTXError):
    """A file checksum or database checksum does not match."""


class TruncatedError(LTXError):
    """The file ended before a field could be read."""


class PositionError(LTXError):
    """An LTX file does not follow from the database's current position."""
