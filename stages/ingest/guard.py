"""img2dataset's fetches under the egress policy (pipeline/egress.py).

img2dataset 1.47.0 fetches in `img2dataset.downloader.download_image` with `urllib.request.urlopen`, in worker
processes that `multiprocessing_distributor` starts with the *spawn* context: nothing patched in this process
reaches them. What does reach them is the `Downloader` object itself, pickled into every task. So:

- `GuardedDownloader` (a subclass of img2dataset's `Downloader`, importable from this module, so it pickles by
  reference) carries the policy, and in whichever process runs a shard installs the guarded opener
  (`egress.guarded_opener`, made `urllib.request.urlopen`'s by `hostlimit.install`, which also holds the
  per-host limits) before delegating to img2dataset's own code. Its
  `urlopen` then resolves, checks and connects through the policy, follows at most 5 checked redirects and no
  proxy. A refusal is an exception like any failed fetch: img2dataset records `str(err)`, "blocked_address:
  ...", as the row's `error_message`, and ingest's conversion turns that into the reason `blocked_address`.
- `guarded_downloads(policy)`: while it is open, `img2dataset.main.download` builds a GuardedDownloader where
  it builds its `Downloader` (it looks the name up in `img2dataset.main` at call time).

Both rely on img2dataset's internals, so the version is pinned (pyproject.toml, requirements.lock) and checked
here; tests/test_hostile.py fails if the hook stops being called (a redirect to a loopback port that is
not allowed would then be followed).
"""

from __future__ import annotations

import datetime
import email.utils
import importlib
import importlib.metadata
import time
import urllib.request
from contextlib import contextmanager

from img2dataset.downloader import Downloader

from pipeline import egress
from pipeline.errors import StageError
from stages.ingest import hostlimit
from stages.ingest.urls import NOT_AN_IMAGE  # the reason of a response that is no image at all
from stages.ingest.urls import TDM_HEADER_ERROR  # the error of a response that reserves TDM by its header

PINNED_VERSION = "1.47.0"  # what this hook was written against: keep in step with pyproject.toml
# the module, not `img2dataset.main` the function that the package's __init__ exports under the same name
i2d_main = importlib.import_module("img2dataset.main")


IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*", b"MM\0*")  # JPEG PNG GIF WebP BMP TIFF


def sniff_not_an_image(head: bytes) -> str | None:
    """Why a response that failed to decode is not an image at all, or None when it may be one (a truncated or
    corrupt image keeps img2dataset's own error). Images are binary and start with a magic number; what a web
    server sends instead (an error page under a .jpg name, a JSON error, an empty body) is text. SVG is text
    too, but an image: img2dataset cannot decode it, and says so itself. One fixed message per kind, so the
    funnel counts them together."""
    if not head.strip():
        return f"{NOT_AN_IMAGE}: an empty response"
    if b"\0" in head or head.startswith(IMAGE_MAGIC):
        return None  # binary: perhaps an image that is truncated or corrupt
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text:
        return None
    if text.startswith(b"<"):
        return f"{NOT_AN_IMAGE}: an HTML page" if b"<html" in text or b"<!doctype html" in text or b"<body" in text \
            else f"{NOT_AN_IMAGE}: an XML or HTML document"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not only a multi-byte character cut at the end of the sniffed head
            return None
    return f"{NOT_AN_IMAGE}: text"


class SniffingResizer:
    """img2dataset's resizer, with a failure to decode a response that is no image at all reported as
    `not_an_image: ...` instead of "Image decoding error" (which sends users hunting for a resize problem).
    img2dataset keeps no bytes of a failed row, so the bytes are looked at here, in the worker, as it fails."""

    HEAD = 1024  # bytes sniffed: enough for a doctype and an <html> tag

    def __init__(self, resizer):
        self.resizer = resizer

    def __call__(self, img_stream, *args, **kwargs):
        out = self.resizer(img_stream, *args, **kwargs)
        if out[-1] is None:
            return out
        img_stream.seek(0)
        why = sniff_not_an_image(img_stream.read(self.HEAD))
        return out if why is None else (*out[:-1], why)


class TdmReservedResponse(Exception):
    """An image response that reserves text and data mining (W3C TDMRep's HTTP header `tdm-reservation: 1`)."""

    def __str__(self) -> str:
        return TDM_HEADER_ERROR


class TdmHeaderProcessor(urllib.request.BaseHandler):
    """A response processor of the guarded opener: a response whose `tdm-reservation` header is 1 is closed
    unread and raised as TdmReservedResponse, which img2dataset records as the row's error (str(err)) and ingest
    turns into `tdm_reserved`. img2dataset reads only X-Robots-Tag from a response's headers, and its opener is
    the only place the headers pass before the body is read."""

    handler_order = 900  # before HTTPErrorProcessor (1000): a redirect's own headers are not what is kept

    def http_response(self, request, response):
        if str(response.headers.get("tdm-reservation", "")).strip() == "1":
            response.close()
            raise TdmReservedResponse()
        return response

    https_response = http_response


def retry_after_seconds(value: str | None, attempt: int, max_wait: float) -> float:
    """How long to wait before asking again: the response's Retry-After (seconds, or an HTTP date: RFC 9110
    10.2.3), else exponential backoff, 1, 2, 4 ... seconds by attempt; never negative, at most `max_wait`."""
    wait = None
    if value:
        value = value.strip()
        if value.isdigit():
            wait = float(value)
        else:
            try:
                when = email.utils.parsedate_to_datetime(value)
                wait = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
            except (TypeError, ValueError, IndexError, OverflowError):
                wait = None
    if wait is None:
        wait = float(2 ** attempt)
    return max(0.0, min(wait, max_wait))


class RetryAfterHandler(urllib.request.BaseHandler):
    """429 Too Many Requests and 503 Service Unavailable: the host asks us to slow down, so wait (its Retry-After,
    else exponential backoff: `retry_after_seconds`) and ask again, up to `tries` times for one request; then the
    error stands, and img2dataset records it (a transient reason). The wait holds one of img2dataset's threads,
    so a busy host slows its own fetches, not the whole crawl's. The retried request goes through the guarded
    opener again (the egress check included)."""

    def __init__(self, tries: int, max_wait: float):
        self.tries, self.max_wait = tries, max_wait

    def http_error_429(self, req, fp, code, msg, headers):
        attempt = getattr(req, "_clipcurate_backoff", 0)
        if attempt >= self.tries:
            return None  # the default handler raises the HTTPError
        wait = retry_after_seconds(headers.get("Retry-After"), attempt, self.max_wait)
        fp.read()
        fp.close()
        time.sleep(wait)
        req._clipcurate_backoff = attempt + 1
        return self.parent.open(req, timeout=req.timeout)

    http_error_503 = http_error_429


class GuardedDownloader(Downloader):
    """img2dataset's Downloader, fetching through the egress policy in the process that runs the shard (and
    naming a response that is no image as such: SniffingResizer; refusing one that reserves TDM by its header:
    TdmHeaderProcessor)."""

    def __init__(self, *args, egress_policy: egress.EgressPolicy, tdm_header: bool = True,
                 backoff: tuple[int, float] = (0, 0.0), host_limits: hostlimit.HostLimits | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.egress_policy = egress_policy
        self.tdm_header = tdm_header
        self.backoff = backoff
        self.host_limits = host_limits
        self.resizer = SniffingResizer(self.resizer)

    def __call__(self, row):
        opener = egress.guarded_opener(self.egress_policy)  # this process's urlopen: cheap, idempotent per shard
        if self.tdm_header:
            opener.add_handler(TdmHeaderProcessor())
        if self.backoff[0] > 0:
            opener.add_handler(RetryAfterHandler(*self.backoff))
        hostlimit.install(opener, self.host_limits)  # per-host slots and spacing, across processes (hostlimit.py)
        return super().__call__(row)


def check_version() -> None:
    """One line when the installed img2dataset is not the one the hook was written against: its fetch path may
    have moved, and a download that silently bypasses the policy is worse than none."""
    got = importlib.metadata.version("img2dataset")
    if got != PINNED_VERSION:
        raise StageError(f"ingest: img2dataset {got} is installed, but clipcurate's egress guard is written against "
                         f"img2dataset=={PINNED_VERSION}: pip install 'img2dataset=={PINNED_VERSION}'")


@contextmanager
def guarded_downloads(policy: egress.EgressPolicy, tdm_header: bool = True, backoff: tuple[int, float] = (0, 0.0),
                      host_limits: hostlimit.HostLimits | None = None):
    """While open, `img2dataset.download(...)` builds a GuardedDownloader carrying `policy` (and, with
    `tdm_header`, refusing responses whose tdm-reservation header is 1). Yields the list of downloaders built, so
    the caller can tell that the download went through the hook."""
    check_version()
    built: list[GuardedDownloader] = []

    def make(*args, **kwargs):
        d = GuardedDownloader(*args, egress_policy=policy, tdm_header=tdm_header, backoff=backoff,
                              host_limits=host_limits, **kwargs)
        built.append(d)
        return d

    stock = i2d_main.Downloader
    i2d_main.Downloader = make
    try:
        yield built
    finally:
        i2d_main.Downloader = stock
