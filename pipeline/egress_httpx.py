"""The egress policy (pipeline/egress.py) for httpx clients: what huggingface_hub (2.x, on `httpx2`) fetches with.

pipeline/egress.py guards urllib. huggingface_hub does not use urllib: it sends every request through one shared
`httpx2.Client`, made by a factory it lets us replace (`huggingface_hub.set_client_factory`). `guarded_client`
builds such a client whose connections obey the same policy, checked in two places:

- every request, the first and each redirect hop (httpx calls a client's request hooks once per hop), goes
  through `egress.check_url`: http/https only, no userinfo, no literal non-global address or localhost name
  outside `allow_private_hosts`; at most `policy.max_redirects` hops (httpx's own limit, set from the policy);
- every TCP connection is opened by `egress.guarded_create_connection`: the host is resolved once (through the
  policy's pins or a replaceable resolver), every address of the answer is checked, and the socket connects to
  a checked address itself, so a second lookup (DNS rebinding) cannot reach another. TLS then runs on that
  socket with SNI and certificate verification for the host name (httpcore's own start_tls).

No proxy: a client given a transport ignores `HTTP(S)_PROXY` (httpx mounts environment proxies only without
one), and `trust_env=False` also drops .netrc credentials (SSL_CERT_FILE/SSL_CERT_DIR are still honoured: a
private CA decides whom TLS trusts, not where a connection goes). A refusal is `egress.Blocked` itself (not wrapped
in an httpx error, so no retry loop treats it as a network blip and nothing mistakes it for "offline"); any
other connection failure is httpcore's ConnectError/ConnectTimeout, as the default backend raises.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

import httpcore2
import httpx2
from httpcore2._backends.sync import SyncStream  # the stream the default SyncBackend wraps its sockets in

from pipeline import egress

__all__ = ["GuardedBackend", "GuardedTransport", "guarded_client"]


class GuardedBackend(httpcore2.SyncBackend):
    """httpcore's sync network backend, connecting only through `egress.guarded_create_connection`."""

    def __init__(self, policy: egress.EgressPolicy = egress.DEFAULT_POLICY, resolver: egress.Resolver | None = None):
        self.policy, self.resolver = policy, resolver

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable | None = None) -> httpcore2.NetworkStream:
        try:
            sock = egress.guarded_create_connection(
                (host, port), timeout, None if local_address is None else (local_address, 0),
                policy=self.policy, resolver=self.resolver)
        except egress.Blocked:
            raise
        except socket.timeout as e:
            raise httpcore2.ConnectTimeout(str(e)) from e
        except OSError as e:  # refused, unreachable, no address: what the default backend calls ConnectError
            raise httpcore2.ConnectError(str(e)) from e
        for option in socket_options or ():
            sock.setsockopt(*option)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return SyncStream(sock)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable | None = None):
        raise egress.Blocked("blocked_address", f"unix socket {path} (TCP to checked addresses only)")


class GuardedTransport(httpx2.HTTPTransport):
    """httpx's default transport (HTTP/1.1, TLS verified with the default context), its connection pool built on
    `GuardedBackend`. Never a proxy."""

    def __init__(self, policy: egress.EgressPolicy = egress.DEFAULT_POLICY, resolver: egress.Resolver | None = None):
        super().__init__(trust_env=False)
        self._pool = httpcore2.ConnectionPool(ssl_context=httpx2.create_ssl_context(),
                                              network_backend=GuardedBackend(policy, resolver))

    @property
    def backend(self) -> GuardedBackend:
        return self._pool._network_backend


def guarded_client(policy: egress.EgressPolicy = egress.DEFAULT_POLICY, resolver: egress.Resolver | None = None,
                   request_hooks: Iterable[Callable] = (), **client_kw) -> httpx2.Client:
    """An httpx2.Client whose every request and connection obeys `policy` (see the module docstring).
    `request_hooks` run after the policy's URL check (e.g. huggingface_hub's own hook)."""

    def check(request: httpx2.Request) -> None:
        egress.check_url(str(request.url), policy)

    return httpx2.Client(transport=GuardedTransport(policy, resolver), trust_env=False,
                         event_hooks={"request": [check, *request_hooks]}, follow_redirects=True,
                         max_redirects=policy.max_redirects, **client_kw)
