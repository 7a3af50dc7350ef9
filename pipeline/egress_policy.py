"""Which requests the egress policy refuses, judged from the URL and the address alone (pipeline/egress.py).

Kept apart from the connection layer so that code which only judges (ingest's URL list, a config's
allow_private_hosts) needs no socket or urllib machinery, and so the rule can be read in one place: the schemes,
userinfo, literal addresses and localhost names `check_url` refuses, and the address ranges `refusal` names. The
names are re-exported by pipeline/egress.py, where callers import them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from collections.abc import Mapping
from urllib.error import URLError
from urllib.parse import urlsplit

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
REASONS = ("blocked_address", "blocked_scheme", "blocked_userinfo", "blocked_redirect")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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
    """An address from a resolver's answer or a config: inet_pton (faster than ipaddress' own IPv6 parser,
    bench/README.md); a zone (`fe80::1%eth0`) is dropped, the address decides."""
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


def check_host(host: str, port: int, policy: EgressPolicy) -> None:
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
        check_host(parts.hostname, port or DEFAULT_PORTS[scheme], policy)

