"""Per-host politeness held across img2dataset's processes and threads: at most `concurrency` requests open to
one host at a time, and one host's request starts spaced at least 1/`rps` seconds apart.

img2dataset downloads each shard in a spawned process with its own thread pool, and none of them knows what
the others are fetching. So the state lives where all of them see it: a folder of small lock files that the
download owns (`download.py` makes it and removes it after), one per (host, slot), named by a hash of the host
so that no name from the data becomes a path. A slot is held with an advisory lock (`fcntl.flock`) on its own
open file description, which conflicts between threads of one process as between processes, and which the
kernel drops when a process dies: a killed worker never leaves a host locked. The spacing is a "next start no
earlier than" time per host in one more file, read and written under that file's lock.

Written here rather than taken from a library: pyrate-limiter (its SQLite bucket with a file lock) holds a
*rate* across processes, but no library on PyPI that we found caps the *open requests* to a key across spawned
processes without a server (Redis); the standard library's `fcntl` does both, with one mechanism and no new
dependency, on the machine that runs the download.

The slot is taken when img2dataset opens the request and given back when it closes the response (after the
body is read, or at once on an error); a redirect or a 429/503 retry (guard.RetryAfterHandler) stays inside the
one slot, so a host asking us to wait is not asked again by another thread meanwhile."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import random
import socket
import time
import urllib.request

from stages.ingest.optout import origin_key

POLL_START, POLL_MAX = 0.005, 0.1  # seconds between tries for a slot: short at first, then backing off


@dataclasses.dataclass(frozen=True)
class HostLimits:
    """`folder`: the download's lock folder (local to the machine that runs img2dataset). `concurrency`: open
    requests per host (0 = no cap); `rps`: request starts per second per host (0 = no spacing); `exempt`:
    "host:port" keys the limits do not apply to (the user's own servers: allow_private_hosts)."""

    folder: str
    concurrency: int = 2
    rps: float = 2.0
    exempt: frozenset = frozenset()

    @property
    def active(self) -> bool:
        return self.concurrency > 0 or self.rps > 0

    def key(self, url: str) -> str | None:
        """"host:port" of the URL (as allow_private_hosts spells it), None when it names no host or is exempt."""
        origin = origin_key(url)
        key = origin.split("://", 1)[1] if origin else None
        return None if key is None or key in self.exempt else key

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest()[:24] + suffix)

    def acquire(self, url: str) -> int | None:
        """Wait for one of the URL's host slots, then for the host's next start time; returns the slot's file
        descriptor (give it to `release`), or None when the URL is not limited."""
        key = self.key(url)
        if key is None or not self.active:
            return None
        fd = self._take_slot(key) if self.concurrency > 0 else None
        try:
            if self.rps > 0:
                self._wait_turn(key)
        except BaseException:
            self.release(fd)
            raise
        return fd

    @staticmethod
    def release(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)  # closing the description drops its flock

    def _take_slot(self, key: str) -> int:
        wait = POLL_START
        while True:
            first = random.randrange(self.concurrency)  # not always slot 0: a busy host's search stays short
            for i in range(self.concurrency):
                slot = (first + i) % self.concurrency
                fd = os.open(self._path(key, f".{slot}.slot"), os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            time.sleep(wait)
            wait = min(wait * 2, POLL_MAX)

    def _wait_turn(self, key: str) -> None:
        """Reserve the host's next start time (now, or the last reserved start + 1/rps if later) and sleep until
        it: reservations are made one at a time under the file's lock, so starts are 1/rps apart whatever
        process or thread makes them."""
        fd = os.open(self._path(key, ".next"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 32, 0).strip()
            now = time.time()
            start = max(now, float(raw) if raw else 0.0)
            os.pwrite(fd, f"{start + 1.0 / self.rps:<32.6f}".encode(), 0)  # fixed width: no stale tail
        finally:
            os.close(fd)
        if start > now:
            time.sleep(start - now)


class _HeldResponse:
    """A response that gives its host slot back when it is closed (img2dataset reads it in a `with` block)."""

    def __init__(self, response, limits: HostLimits, fd: int | None):
        self._response, self._limits, self._fd = response, limits, fd

    def __getattr__(self, name):
        return getattr(self._response, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return iter(self._response)

    def close(self) -> None:
        try:
            self._response.close()
        finally:
            fd, self._fd = self._fd, None
            self._limits.release(fd)


class LimitedOpener:
    """What `urllib.request.urlopen` calls in a download worker (install): each request waits for its host's
    slot and turn, then goes through the guarded opener (egress policy, redirects, backoff) unchanged."""

    def __init__(self, opener: urllib.request.OpenerDirector, limits: HostLimits):
        self.opener, self.limits = opener, limits

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        fd = self.limits.acquire(fullurl if isinstance(fullurl, str) else fullurl.full_url)
        try:
            response = self.opener.open(fullurl, data, timeout)
        except BaseException:
            self.limits.release(fd)
            raise
        return _HeldResponse(response, self.limits, fd) if fd is not None else response


def install(opener: urllib.request.OpenerDirector, limits: HostLimits | None) -> None:
    """This process's `urlopen` through `opener`, under `limits` when they limit anything."""
    urllib.request.install_opener(LimitedOpener(opener, limits) if limits is not None and limits.active else opener)
