"""Remote shards that survive faults: ``http(s)://`` and ``pipe:`` streams that retry instead of ending the run.

Object stores answer 503, reset connections and cut responses short. ``open_shard(url)`` returns a file object whose
reads continue where a failure left off: an HTTP stream is reopened with ``Range: bytes=N-`` (or, when the server
ignores ranges, re-read from the start with the first N bytes discarded), a ``pipe:`` command is rerun with its
first N bytes discarded. The bytes handed out are therefore exactly those of a fault-free read, and the tar reader
above never notices. Retries wait ``delay · 2^k`` seconds (at most a minute); when ``retries`` are spent the read
raises :class:`RemoteShardError`, and the loader skips the rest of that shard and counts it. Every retry is counted
(``counts["remote_retries"]``) and logged.

Local paths are opened as plain files; other schemes go through webdataset's ``gopen`` (no retries).
"""

from __future__ import annotations

import http.client
import io
import logging
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter

log = logging.getLogger(__name__)
MAX_DELAY = 60.0
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
TIMEOUT = 60.0  # seconds without a byte before a connection counts as dropped


class RemoteShardError(OSError):
    """A remote shard that could not be read to its end within the retries."""


class TransientError(OSError):
    """A failure worth retrying (a cut body, a non-zero pipe exit, a 5xx)."""


class ResumableStream(io.RawIOBase):
    """Read-only stream of one remote shard that reopens at the byte it reached after a transient failure."""

    def __init__(self, url: str, retries: int = 5, delay: float = 1.0, counts: Counter | None = None):
        self.url, self.retries, self.delay = url, retries, delay
        self.counts = counts if counts is not None else Counter()
        self.pos = 0  # bytes handed out so far
        self.length: int | None = None  # the whole body's size, when the server says it
        self._src = None
        self._proc: subprocess.Popen | None = None
        self._stderr = None  # a pipe command's stderr, in a file: a pipe could fill and stall the command
        self._failed: RemoteShardError | None = None  # once given up, every later read fails at once
        self._with_retries(self._open)

    # -- opening ------------------------------------------------------------------------------------------------
    def _open(self):
        self._close_source()
        if self.url.startswith("pipe:"):
            import tempfile

            self._stderr = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(self.url[5:], shell=True, stdout=subprocess.PIPE, stderr=self._stderr)
            self._src = self._proc.stdout
            self._discard(self.pos)
            return
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-"} if self.pos else {})
        try:
            resp = urllib.request.urlopen(request, timeout=TIMEOUT)  # noqa: S310 — the user's own shard URL
        except urllib.error.HTTPError as e:
            if e.code in TRANSIENT_HTTP:
                raise TransientError(f"HTTP {e.code} {e.reason}") from None
            raise RemoteShardError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        self._src = resp
        if resp.status == 206:  # the server resumed at self.pos
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            self.length = int(total) if total.isdigit() else self.length
        else:
            length = resp.headers.get("Content-Length")
            self.length = int(length) if length and length.isdigit() else None
            self._discard(self.pos)  # ranges ignored: the whole body again; skip what was already handed out

    def _discard(self, n: int):
        while n > 0:
            chunk = self._src.read(min(n, 1 << 20))
            if not chunk:
                raise TransientError(f"the stream ended before the {self.pos} bytes already read")
            n -= len(chunk)

    def _close_source(self):
        if self._src is not None:
            try:
                self._src.close()
            except OSError:
                pass
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._src = None

    # -- retries ------------------------------------------------------------------------------------------------
    def _with_retries(self, action):
        """``action()``, reopening the stream at the current byte and trying again after each transient failure (a
        failed reopen counts as one too), ``retries`` times at most."""
        if self._failed is not None:
            raise self._failed
        attempt = 0
        while True:
            try:
                if self._src is None and action != self._open:
                    self._open()
                return action()
            except (TransientError, ConnectionError, TimeoutError, http.client.HTTPException,
                    urllib.error.URLError) as e:
                self._close_source()  # the next try reopens at self.pos
                if isinstance(e, urllib.error.HTTPError) and e.code not in TRANSIENT_HTTP:
                    self._failed = RemoteShardError(f"{self.url}: HTTP {e.code}")
                    raise self._failed from None
                if attempt == self.retries:
                    self._failed = RemoteShardError(f"{self.url}: gave up after {self.retries} retries at byte "
                                                    f"{self.pos} ({type(e).__name__}: {e})")
                    raise self._failed from None
                wait = min(MAX_DELAY, self.delay * 2 ** attempt)
                attempt += 1
                self.counts["remote_retries"] += 1
                log.warning("shard %s: %s at byte %d; retry %d of %d in %.1f s", self.url,
                            f"{type(e).__name__}: {e}", self.pos, attempt, self.retries, wait)
                time.sleep(wait)

    # -- reading ------------------------------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def _read_some(self, b) -> int:
        n = self._src.readinto(b)
        if n:
            return n
        # EOF: a pipe must have exited cleanly; an HTTP body must have its announced length
        if self._proc is not None:
            code = self._proc.wait()
            if code != 0:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace").strip().splitlines()
                raise TransientError(f"`{self.url[5:]}` exited with {code}" + (f": {err[-1]}" if err else ""))
        elif self.length is not None and self.pos < self.length:
            raise TransientError(f"the body ended before its {self.length} bytes")
        return 0

    def readinto(self, b) -> int:
        n = self._with_retries(lambda: self._read_some(b))
        self.pos += n
        return n

    def close(self):
        self._close_source()
        super().close()


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:"))


def open_shard(url: str, retries: int = 5, delay: float = 1.0, counts: Counter | None = None):
    """A binary file object for a shard URL: local files plainly, http(s) and pipe: with retries, other schemes
    through webdataset's gopen."""
    if is_remote(url):
        return io.BufferedReader(ResumableStream(url, retries, delay, counts), buffer_size=1 << 16)
    if "://" in url:
        from webdataset.gopen import gopen

        return gopen(url)
    return open(url, "rb")


__all__ = ["RemoteShardError", "ResumableStream", "open_shard", "is_remote"]
