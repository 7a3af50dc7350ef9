"""A host on 127.0.0.1 for tests that must see what the code sends: network traffic in tests goes to loopback only.

`LoopbackServer(route)` answers every GET with `route(path) -> (status, headers, body)` from a thread, on a free
port; it counts the connections it accepts (a fetch the egress policy refuses must not even connect) and records
each request's (path, Host) and User-Agent. Used as a context manager: started on enter, shut down on exit."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    def __init__(self, route):
        self.route, self.connections, self.requests, self.agents = route, 0, [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                outer.requests.append((self.path, self.headers.get("Host")))
                outer.agents.append(self.headers.get("User-Agent"))
                code, headers, body = outer.route(self.path)
                self.send_response(code)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address):
                outer.connections += 1
                return True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
