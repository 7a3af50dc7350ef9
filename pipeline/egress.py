"""One egress policy for every request the project makes.

A URL list, a crawl and a pool come from the open web: a URL in them may name `http://169.254.169.254/` (cloud
metadata), `http://127.0.0.1:6379/`, `file:///etc/passwd`, or a host whose DNS answer is a private address. The
pipeline fetches on the user's machine, inside the user's network, so such a URL is a request forgery. Every fetch
the project makes goes through this module:

- `check_url(url, policy)`: schemes http and https only (`blocked_scheme`), no userinfo (`user@host`,
  `blocked_userinfo`: the classic way to make a URL read as one host and connect to another), and a host that is
  a literal address (also the numeric spellings `inet_aton` accepts: `2130706433`, `0x7f.1`, `127.1`, `0`; IPv6
  literals; IPv4-mapped `::ffff:127.0.0.1`) or a `localhost` name is refused at once (`blocked_address`),
  before any lookup or byte is sent.
- `refusal(ip)` / `address_allowed(ip)`: loopback, private (RFC 1918, fc00::/7), link-local (169.254/16,
  fe80::/10), CGNAT (100.64/10), multicast, reserved, unspecified, documentation and benchmark ranges, and the
  IPv6 forms that embed an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, NAT64) are judged by the address
  they carry. Anything `ipaddress` does not call global is refused too.
- `guarded_opener(policy)`: a urllib opener whose connections resolve the host once (through a replaceable
  resolver), check every address of the answer, and connect to the checked address itself: no second lookup,
  so DNS rebinding (a first answer public, the next private) cannot slip past. HTTPS still verifies the
  certificate and sends SNI for the host name. Redirects: at most `max_redirects` hops, each through the same
  checks (`blocked_redirect` beyond). No proxy handler: a proxy would receive the request and make the
  connection itself, hiding the destination from the check, so `http_proxy`/`https_proxy` are ignored.

`EgressPolicy.allow_private_hosts` lists exact "host:port" pairs exempt from the address rule, and from nothing
else (a demo's loopback server, a test's). `pinned` maps "host:port" to the (ip, port) to connect to instead of
resolving, as `curl --resolve` does: the demo world's `demo.clipcurate.invalid:80` is served on loopback. A
pinned address is still checked unless its host:port is allowed.

A refusal is `Blocked(reason, msg)`, a `URLError` (code that treats failed fetches as failures keeps working);
its str() is "reason: msg", which img2dataset records as the row's error (stages/ingest/guard.py).

The rule (which URL or address is refused: `check_url`, `refusal`, `EgressPolicy`) lives in
pipeline/egress_policy.py; this module applies it to connections, and every name above is importable from here.
"""

from __future__ import annotations

import functools
import http.client
import socket
import urllib.request
from collections.abc import Callable
from urllib.error import URLError
from urllib.parse import urljoin

from pipeline.egress_policy import (  # noqa: F401 (the rule, re-exported: callers import every name from here)
    DEFAULT_POLICY,
    DEFAULT_PORTS,
    REASONS,
    SCHEMES,
    Address,
    Blocked,
    EgressPolicy,
    address_allowed,
    check_host,
    check_url,
    host_key,
    literal_address,
    parse_host_port,
    refusal,
)

__all__ = ["EgressPolicy", "Blocked", "check_url", "refusal", "address_allowed", "literal_address", "resolve",
           "guarded_opener", "urlopen", "host_key", "parse_host_port", "REASONS"]

Resolver = Callable[[str, int], list[str]]


# ---- resolution and connection --------------------------------------------------------------------------------
def resolve(host: str, port: int) -> list[str]:
    """The system resolver: every address of `host` (tests replace it: `guarded_opener(policy, resolver=...)`)."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _checked_addresses(host: str, port: int, policy: EgressPolicy, resolver: Resolver | None) -> list[tuple[str, int]]:
    """(ip, port) pairs to connect to for host:port: the pinned one, or the resolver's answer; every one checked.
    One refused address refuses the host (a name that also points inward is not trusted for its other ones)."""
    exempt = policy.exempt(host, port)
    if not exempt:
        check_host(host, port, policy)
    pin = policy.pinned.get(host_key(host, port))
    if pin is not None:
        targets = [pin]
    else:
        addr = literal_address(host)
        ips = [str(addr)] if addr is not None else (resolver or resolve)(host, port)
        targets = [(ip, port) for ip in ips]
    if not targets:
        raise URLError(f"{host}: no address")
    if not exempt:
        for ip, _ in targets:
            why = refusal(ip)
            if why:
                raise Blocked("blocked_address", f"{host} resolves to {ip}: {why}")
    return targets


def guarded_create_connection(address: tuple[str, int], timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
                              source_address=None, *, policy: EgressPolicy = DEFAULT_POLICY,
                              resolver: Resolver | None = None) -> socket.socket:
    """socket.create_connection, but to checked addresses only, and to the very addresses that were checked."""
    host, port = address
    last: OSError | None = None
    for ip, p in _checked_addresses(host, port, policy, resolver):
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect((ip, p))
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last  # type: ignore[misc]


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, *, policy: EgressPolicy, resolver: Resolver | None, **kw):
        super().__init__(host, **kw)
        self._create_connection = functools.partial(guarded_create_connection, policy=policy, resolver=resolver)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    """TLS on the checked socket: SNI and certificate verification for the host name (HTTPSConnection's)."""

    def __init__(self, host, *, policy: EgressPolicy, resolver: Resolver | None, **kw):
        super().__init__(host, **kw)
        self._create_connection = functools.partial(guarded_create_connection, policy=policy, resolver=resolver)


def _unwrapped(fn):
    """urllib wraps an OSError raised while connecting in URLError(err): a refusal comes out as itself."""

    @functools.wraps(fn)
    def run(self, req):
        try:
            return fn(self, req)
        except URLError as e:
            if isinstance(e.reason, Blocked):
                raise e.reason from None
            raise

    return run


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: EgressPolicy, resolver: Resolver | None):
        super().__init__()
        self._conn = functools.partial(_GuardedHTTPConnection, policy=policy, resolver=resolver)

    @_unwrapped
    def http_open(self, req):
        return self.do_open(self._conn, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: EgressPolicy, resolver: Resolver | None, context=None):
        super().__init__(context=context)
        self._conn = functools.partial(_GuardedHTTPSConnection, policy=policy, resolver=resolver)

    @_unwrapped
    def https_open(self, req):
        return self.do_open(self._conn, req, context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """At most `max_redirects` hops; each target through check_url before urllib looks at it (urllib itself
    would follow a redirect to ftp://); the hop's connection is checked again by the opener's handlers."""

    def __init__(self, policy: EgressPolicy):
        self.policy = policy
        self.max_redirections = policy.max_redirects + 1  # ours counts first; urllib's stays a backstop

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            try:
                hops = getattr(req, "_egress_hops", 0)
                if hops >= self.policy.max_redirects:
                    raise Blocked("blocked_redirect", f"more than {self.policy.max_redirects} redirects")
                check_url(urljoin(req.full_url, target.strip()), self.policy)
            except URLError:
                fp.close()
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new._egress_hops = getattr(req, "_egress_hops", 0) + 1
        return new


class GuardedOpener(urllib.request.OpenerDirector):
    """An opener that checks the URL of every request it opens (the first and each redirect hop)."""

    def __init__(self, policy: EgressPolicy):
        super().__init__()
        self.policy = policy

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        check_url(fullurl if isinstance(fullurl, str) else fullurl.full_url, self.policy)
        return super().open(fullurl, data, timeout)


def guarded_opener(policy: EgressPolicy = DEFAULT_POLICY, resolver: Resolver | None = None,
                   ssl_context=None) -> GuardedOpener:
    """An OpenerDirector built by hand with HTTP(S), redirects and HTTP errors only. Not `build_opener`, which
    adds FTP, file: and data: handlers, and a ProxyHandler reading `http_proxy` (a proxy would make the
    connection itself, out of the check's sight). `resolver(host, port) -> [ip, ...]`: default `resolve`."""
    opener = GuardedOpener(policy)
    for handler in (urllib.request.UnknownHandler(), _GuardedHTTPHandler(policy, resolver),
                    _GuardedHTTPSHandler(policy, resolver, ssl_context), urllib.request.HTTPDefaultErrorHandler(),
                    _GuardedRedirectHandler(policy), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def urlopen(url, policy: EgressPolicy = DEFAULT_POLICY, timeout: float = 10, resolver: Resolver | None = None):
    """One guarded fetch, for code of the project's own (robots.txt, TDMRep, model files)."""
    return guarded_opener(policy, resolver).open(url, timeout=timeout)
