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
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import ipaddress
import re
import socket
import urllib.request
from collections.abc import Callable, Mapping
from urllib.error import URLError
from urllib.parse import urljoin, urlsplit

__all__ = ["EgressPolicy", "Blocked", "check_url", "refusal", "address_allowed", "literal_address", "resolve",
           "guarded_opener", "urlopen", "host_key", "parse_host_port", "REASONS"]

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
REASONS = ("blocked_address", "blocked_scheme", "blocked_userinfo", "blocked_redirect")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class Blocked(URLError):
    """A request the egress policy refuses. `reason` is one of REASONS; str() is "reason: msg" (one line)."""

    def __init__(self, reason: str, msg: str):
        super().__init__(reason)
        self.msg = msg
        self.args = (reason, msg)  # picklable: a worker's exception may cross a process boundary

    def __str__(self) -> str:
        return f"{self.reason}: {self.msg}"


# ---- the policy ---------------------------------------------------------------------------------------------
def host_key(host: str, port: int) -> str:
    """"host:port" as allow_private_hosts and pinned spell it: host lower-cased, an IPv6 host in brackets."""
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")


def parse_host_port(text: str) -> tuple[str, int]:
    """"HOST:PORT" -> (host, port); ValueError saying what is wrong. A port is always named: the exemption is
    for one service, never for every port of a host."""
    m = _HOST_PORT.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. \"demo.clipcurate.invalid:80\", \"127.0.0.1:8000\", "
                         "\"[::1]:8000\")")
    host = m.group(1).strip("[]")
    if ":" in host:
        ipaddress.IPv6Address(host)  # ValueError for a bracketed non-address
    return host.lower(), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class EgressPolicy:
    """What may be fetched. Picklable (it travels to img2dataset's worker processes)."""

    allow_private_hosts: frozenset[str] = frozenset()  # exact "host:port": exempt from the address rule only
    max_redirects: int = 5
    pinned: Mapping[str, tuple[str, int]] = dataclasses.field(default_factory=dict)  # "host:port" -> (ip, port)

    def __post_init__(self):
        object.__setattr__(self, "allow_private_hosts",
                           frozenset(host_key(*parse_host_port(h)) for h in self.allow_private_hosts))
        object.__setattr__(self, "pinned", {host_key(*parse_host_port(k)): (str(ip), int(port))
                                            for k, (ip, port) in dict(self.pinned).items()})

    def exempt(self, host: str, port: int) -> bool:
        return host_key(host, port) in self.allow_private_hosts


DEFAULT_POLICY = EgressPolicy()


# ---- addresses ----------------------------------------------------------------------------------------------
def _nets(*pairs: tuple[str, str]) -> tuple:
    """(first, last, why) as integers: a range test per network costs two int comparisons."""
    nets = [(ipaddress.ip_network(n), why) for n, why in pairs]
    return tuple((int(n.network_address), int(n.broadcast_address), why) for n, why in nets)


# checked in order; the first match names the refusal. `is_global` below catches what a newer IANA table adds.
_V4_REFUSED = _nets(
    ("0.0.0.0/32", "unspecified"), ("0.0.0.0/8", "'this network' (reaches the local host)"),
    ("127.0.0.0/8", "loopback"), ("10.0.0.0/8", "private (RFC 1918)"), ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"), ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("169.254.0.0/16", "link-local (cloud metadata lives here)"), ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"), ("198.51.100.0/24", "documentation"), ("203.0.113.0/24", "documentation"),
    ("198.18.0.0/15", "benchmarking"), ("192.88.99.0/24", "6to4 relay anycast"), ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # 255.255.255.255 (broadcast) included
)
_V6_REFUSED = _nets(
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("::/96", "IPv4-compatible (deprecated)"),
    ("100::/64", "discard-only"), ("2001::/23", "IETF protocol assignments (Teredo, ...)"),
    ("2001:db8::/32", "documentation"), ("64:ff9b:1::/48", "local-use NAT64"), ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"), ("fec0::/10", "site-local (deprecated)"), ("ff00::/8", "multicast"),
    ("::/8", "reserved"),
)
_NAT64 = _nets(("64:ff9b::/96", "NAT64"))[0][:2]


def _parse(ip: str) -> Address:
    """An address from a resolver's answer or a config: inet_pton (20x faster than ipaddress' own IPv6 parser);
    a zone (`fe80::1%eth0`) is dropped, the address decides."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, ip))
    except OSError:
        pass
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, ip.partition("%")[0]))
    except OSError:
        return ipaddress.ip_address(ip)  # ValueError, with ipaddress' message


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002:aabb:ccdd::), NAT64
    (64:ff9b::a.b.c.d). Connecting to these reaches (or may be translated to) that IPv4 host."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if _NAT64[0] <= int(ip) <= _NAT64[1]:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: str | Address) -> str | None:
    """Why this address may not be connected to, or None when it may. IPv6 forms that embed an IPv4 address
    are judged by that address ("::ffff:127.0.0.1: embeds 127.0.0.1, loopback")."""
    addr = _parse(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_v4(addr)
        if inner is not None:
            why = refusal(inner)
            return f"embeds {inner}, {why}" if why else None
        table = _V6_REFUSED
    else:
        table = _V4_REFUSED
    value = int(addr)
    for first, last, why in table:
        if first <= value <= last:
            return why
    if not addr.is_global:
        return "not a global address"
    return None


def address_allowed(ip: str | Address) -> bool:
    return refusal(ip) is None


_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")


def literal_address(host: str) -> Address | None:
    """The address a URL's host spells, or None for a name. Covers what `inet_aton` (and so the resolver)
    accepts besides dotted quads: `2130706433`, `0x7f.1`, `127.1`, `0177.0.0.1`, `0`; and IPv6 literals
    (with a zone)."""
    h = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(h):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def _is_localhost_name(host: str) -> bool:
    """`localhost` and `*.localhost` (RFC 6761: always loopback), refused without asking the resolver."""
    h = host.rstrip(".").lower()
    return h == "localhost" or h.endswith(".localhost")


def _check_host(host: str, port: int, policy: EgressPolicy) -> None:
    """Refuse a literal non-global address or a localhost name at once, unless host:port is allowed."""
    if policy.exempt(host, port):
        return
    if _is_localhost_name(host):
        raise Blocked("blocked_address", f"{host} is loopback (a localhost name)")
    addr = literal_address(host)
    if addr is not None:
        why = refusal(addr)
        if why:
            shown = host if host.strip("[]").rstrip(".").lower() == str(addr) else f"{host} ({addr})"
            raise Blocked("blocked_address", f"{shown} is {why}")


# ---- URLs ---------------------------------------------------------------------------------------------------
def check_url(url: str, policy: EgressPolicy = DEFAULT_POLICY) -> None:
    """Raise Blocked for a URL the policy refuses before any byte is sent: another scheme, userinfo, a literal
    address (or localhost name) outside the allowed host:port pairs. A name is checked when it is resolved
    (`guarded_opener`). A URL too malformed to parse raises URLError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise URLError(f"malformed URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise Blocked("blocked_scheme", f"{scheme or 'no'} scheme (http and https only)")
    if "@" in parts.netloc:
        raise Blocked("blocked_userinfo", "user@host in a URL (a URL naming one host while reaching another)")
    if parts.hostname:
        _check_host(parts.hostname, port or DEFAULT_PORTS[scheme], policy)


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
        _check_host(host, port, policy)
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
