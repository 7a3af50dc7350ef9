"""A loopback web server for the demo world, so that ingest crawls it exactly as it would crawl the web.

The demo's URLs name a host that does not resolve (`demo.clipcurate.invalid`, RFC 6761 reserves `.invalid`).
Instead of rewriting them to 127.0.0.1 (which would make the URL list differ from what a user ships), we
run a small HTTP *proxy* on 127.0.0.1 and point `http_proxy` at it: img2dataset fetches with urllib, which
honours the variable, sends the absolute URL to the proxy, and the proxy answers from the world's `www/`
folder. Unknown hosts get 403 (nothing leaves the machine), missing files 404.

    with serve_world("world/www") as proxy:
        os.environ.update(proxy_env(proxy))
        ...download...
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
    """Serve `www_dir` as the given host(s) through a proxy on 127.0.0.1 (free port); yields the proxy URL."""
    root = Path(www_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{www_dir}: not a folder to serve (expected a demo world's www/)")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, frozenset(h.lower() for h in hosts)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="clipcurate-serve", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    log.info("serving %s as %s via proxy %s", root, ", ".join(hosts), url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def proxy_env(proxy_url: str) -> dict[str, str]:
    """Environment that sends http(s) fetches through the proxy (urllib and requests read these)."""
    return {
        "http_proxy": proxy_url,
        "HTTP_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "HTTPS_PROXY": proxy_url,
        # loopback stays direct (Dask, the proxy itself); nothing else is exempted
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
    }
