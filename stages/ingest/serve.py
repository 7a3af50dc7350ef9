"""A loopback web server for the demo world, so that ingest crawls it exactly as it would crawl the web.

The demo's URLs name a host that does not resolve (`demo.clipcurate.invalid`, RFC 6761 reserves `.invalid`).
Instead of rewriting them to 127.0.0.1 (which would make the URL list differ from what a user ships), the server
runs on 127.0.0.1 and ingest's egress policy pins the host there (`EgressPolicy.pinned`, like `curl --resolve`;
stages/ingest/download.py): the request is an ordinary one, `GET /img/x.jpg` with `Host: demo.clipcurate.invalid`,
answered from the world's `www/` folder. Loopback is an internal address: the policy fetches from it only because
the demo's config lists `demo.clipcurate.invalid:80` in `[ingest] allow_private_hosts`. Unknown hosts get 403,
missing files 404.

The server also answers proxy requests (an absolute URL in the request line): `proxy_env` points urllib's stock
opener there, which the benchmarks use to time img2dataset unmodified. The pipeline never uses a proxy.

    with serve_world("world/www") as server:   # "http://127.0.0.1:PORT"
        ...download with EgressPolicy(allow_private_hosts={"demo.clipcurate.invalid:80"},
                                      pinned={"demo.clipcurate.invalid:80": ("127.0.0.1", PORT)})...
"""

from __future__ import annotations

import logging
import mimetypes
import os
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger("clipcurate.serve")

DEMO_HOST = "demo.clipcurate.invalid"


def _handler(root: Path, hosts: frozenset[str]):
    class WorldHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _resolve(self) -> tuple[int, Path | None]:
            parts = urlsplit(self.path)
            host = (parts.hostname or self.headers.get("Host", "").split(":")[0]).lower()
            if host not in hosts:
                return 403, None
            rel = unquote(parts.path).lstrip("/")
            target = (root / rel).resolve()
            if root not in target.parents or not target.is_file():
                return 404, None
            return 200, target

        def _send(self, head_only: bool) -> None:
            code, target = self._resolve()
            if code != 200:
                body = f"{code}\n".encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head_only:
                    self.wfile.write(body)
                return
            data = target.read_bytes()
            self.send_response(200)
            # like many real servers, the type follows the file name, not the bytes (a .jpg may be HTML)
            self.send_header("Content-Type", mimetypes.guess_type(target.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head_only:
                self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._send(False)

        def do_HEAD(self):  # noqa: N802
            self._send(True)

        def log_message(self, fmt, *args):  # quiet: thousands of requests per demo
            log.debug("%s " + fmt, self.address_string(), *args)

    return WorldHandler


@contextmanager
def serve_world(www_dir: str | os.PathLike, hosts: tuple[str, ...] = (DEMO_HOST,)):
    """Serve `www_dir` as the given host(s) on 127.0.0.1 (free port); yields the server's URL."""
    root = Path(www_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{www_dir}: not a folder to serve (expected a demo world's www/)")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, frozenset(h.lower() for h in hosts)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="clipcurate-serve", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    log.info("serving %s as %s at %s", root, ", ".join(hosts), url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def proxy_env(proxy_url: str) -> dict[str, str]:
    """Environment that sends stock urllib's http(s) fetches to the server as a proxy: for benchmarks of
    img2dataset unmodified only (the egress policy ignores proxies, pipeline/egress.py)."""
    return {
        "http_proxy": proxy_url,
        "HTTP_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "HTTPS_PROXY": proxy_url,
        # loopback stays direct (Dask, the proxy itself); nothing else is exempted
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
    }
