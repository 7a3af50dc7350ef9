"""What a host's policy files say: its robots.txt (RFC 9309) and `/.well-known/tdmrep.json` (W3C TDMRep), one
fetch each, parsed and matched against URLs. Which hosts are fetched, when, and what is recorded: optout.py.

robots.txt, RFC 9309 (parsed with protego, Scrapy's RFC 9309 parser):
- groups are matched against the user agent's *product token* (§2.2.1: the part before "/" of
  `[ingest] user_agent`, case-insensitive), else the `*` group, else no rule applies;
- 2xx: the file's rules; the longest matching pattern wins, allow over disallow at a tie (§2.2.2);
- a file over 500 KiB: its first 500 KiB are parsed (§2.5: crawlers MUST parse at least 500 KiB);
- redirects: followed, at most 5 hops (§2.3.1.2); more: the file is taken as unavailable (which §2.3.1.2 allows);
- 4xx ("unavailable", §2.3.1.3, 429 included as the RFC words it): no rule applies, every URL is allowed;
- 5xx or no answer (connection refused, timeout, DNS failure: "unreachable", §2.3.1.4): every URL of the host is
  disallowed (`robots_disallowed`);
- a fetch the egress policy refuses (a host whose name resolves inward, a robots.txt redirecting to a refused
  address): the host's URLs are set aside with the egress reason (`blocked_address`, ...) and no request to it
  is made; an image fetch from it would be refused anyway.

TDMRep (W3C TDMRep Community Group Final Report, "TDM File on the Origin Server"; its JSON form at
`/.well-known/tdmrep.json`): an array of {"location": pattern, "tdm-reservation": 0|1, "tdm-policy": url},
`location` and `tdm-reservation` mandatory. `location` is a path pattern with robots.txt's syntax (`*` any
characters, a trailing `$` the end; the report reuses the robots.txt draft's wording), matched case-sensitively,
percent-escapes normalised as for robots.txt; "the most specific match is the first in sequence": the first rule
in file order whose location matches the URL's path (and query) decides, `tdm-reservation: 1` is reserved
(`tdm_reserved`), 0 is not; no match: unset (null). A non-2xx answer or no answer: "the origin server does not
implement this protocol": no reservation from the file (the report's other ways, the response header and the HTML
or EPUB/PDF metadata, then apply: the header is checked after the download, issue 32 item 2). A malformed file
(not JSON, not an array, a rule without a string location or with a reservation other than 0/1, over
`TDMREP_MAX`): no reservation, recorded as `malformed` with what is wrong. The report lets a response header
supersede the file (its "Processing priority"); a URL the file reserves is never requested here, so such an
override is never seen: the file's reservation stands (the conservative reading).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import urllib.request
from urllib.error import HTTPError, URLError

import polars as pl

from pipeline import egress

ROBOTS_DISALLOWED, TDM_RESERVED = "robots_disallowed", "tdm_reserved"
REASONS = (ROBOTS_DISALLOWED, TDM_RESERVED)  # bare reasons, as the egress policy's (one each, whatever the host)
ROBOTS_MAX = 500 * 1024  # RFC 9309 §2.5: parse at least the first 500 KiB
TDMREP_MAX = 1024 * 1024  # a tdmrep.json larger than this is malformed (no reservation), not read on
POLICY_TIMEOUT = 5.0  # seconds per policy fetch at most (the smaller of this and [ingest] timeout)
DEFAULT_USER_AGENT = "clipcurate/0.1 (+CONTACT)"
_PRODUCT = re.compile(r"[A-Za-z_-]+")  # RFC 9309 §2.2.1: a product token is letters, "_" and "-"
# protego's own "already normal" path (its _QUOTED_URL, without the look-ahead the Rust regex engine lacks)
_NORMAL_PATH = r"^(?:[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)?(/(?:[A-Za-z0-9_.~=-][A-Za-z0-9_.~/=-]*)?)$"


# ---- the user agent ---------------------------------------------------------------------------------------
def product_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against: `user_agent` up to its first "/" or space
    (RFC 9309 §2.2.1). ValueError when it is not one (letters, "_" and "-" only)."""
    token = re.split(r"[/\s]", user_agent.strip(), maxsplit=1)[0]
    if not _PRODUCT.fullmatch(token):
        raise ValueError(f"{user_agent!r} does not start with a product token (letters, '_' and '-', then '/': "
                         f"e.g. \"{DEFAULT_USER_AGENT}\")")
    return token


def contact(user_agent: str) -> str:
    """The contact a user agent names: the "+..." part (a URL) or an e-mail address; "" for none or the
    placeholder CONTACT."""
    m = re.search(r"\+\s*([^;)\s]+)", user_agent) or re.search(r"([^\s;()<>]+@[^\s;()<>]+)", user_agent)
    got = m.group(1) if m else ""
    return "" if got.upper() == "CONTACT" else got


def contact_warning(user_agent: str) -> str | None:
    if contact(user_agent):
        return None
    return (f"[ingest] user_agent {user_agent!r} names no contact: site owners who read their logs cannot reach "
            f"you; set it, e.g. user_agent = \"clipcurate/0.1 (+https://example.org/crawler; you@example.org)\"")


# ---- fetching ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fetched:
    """One policy fetch: `kind` ok (2xx) | http (another status) | unreachable | blocked; `body` (ok only, at most
    the limit), `truncated` when there was more, `error` one line."""

    kind: str
    http: int | None = None
    body: bytes | None = None
    truncated: bool = False
    error: str | None = None
    blocked: str | None = None  # the egress reason, kind == "blocked"
    fetched_at: str = ""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def fetch(url: str, policy: egress.EgressPolicy, user_agent: str, timeout: float, limit: int) -> Fetched:
    """GET `url` through the egress policy, reading at most `limit` bytes (+1 to tell a longer file)."""
    at = _now()
    req = urllib.request.Request(url, headers={"User-Agent": user_agent, "Accept": "*/*"})
    try:
        with egress.urlopen(req, policy, timeout=timeout) as r:
            body = r.read(limit + 1)
            return Fetched("ok", r.status, body[:limit], len(body) > limit, fetched_at=at)
    except egress.Blocked as e:
        return Fetched("blocked", error=str(e), blocked=e.reason, fetched_at=at)
    except HTTPError as e:
        e.close()
        return Fetched("http", e.code, error=f"HTTP {e.code}", fetched_at=at)
    except (URLError, OSError, ValueError) as e:  # refused, reset, timeout, DNS failure, a broken answer
        why = e.reason if isinstance(e, URLError) else e
        return Fetched("unreachable", error=(f"{type(why).__name__}: {why}" if str(why) else type(why).__name__)
                       .replace("\n", " ")[:200], fetched_at=at)


# ---- robots.txt ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Robots:
    """A host's robots.txt as ingest uses it. `status`: ok | unavailable (4xx, or too many redirects: allow all)
    | unreachable (5xx, no answer: disallow all) | blocked (the egress policy refused the fetch) | not_checked."""

    status: str
    http: int | None = None
    body: bytes | None = None
    truncated: bool = False
    error: str | None = None
    blocked: str | None = None
    fetched_at: str | None = None
    _parser: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.body).hexdigest() if self.body is not None else None

    def parser(self):
        """protego's parse of the file (once)."""
        if self._parser is None:
            self._parser = _parse_robots(self.body or b"")
        return self._parser

    def rules(self, token: str) -> list[tuple[str, str]] | None:
        """[(field, normalised pattern)] of the group that applies to `token`, in the order they are tried
        (longest pattern first, allow first at a tie: RFC 9309 §2.2.2); [] when no group applies or the file
        is not ok. None when protego's internals are not the ones this was written against."""
        if self.status != "ok" or self.body is None:
            return []
        try:
            group = self.parser()._get_matching_rule_set(token)
            return [] if group is None else [(r.field, r.value._pattern) for r in group._rules]
        except AttributeError:  # another protego: fall back to can_fetch per URL (no rule recorded)
            return None


def robots_of(f: Fetched) -> Robots:
    """RFC 9309 §2.3.1's reading of a fetch: 2xx ok; 4xx unavailable; 5xx or none unreachable; too many redirects
    unavailable (§2.3.1.2); another refusal of the egress policy: blocked."""
    common = dict(http=f.http, error=f.error, fetched_at=f.fetched_at)
    if f.kind == "ok":
        return Robots("ok", body=f.body, truncated=f.truncated, **common)
    if f.kind == "http" and f.http is not None and 400 <= f.http < 500:
        return Robots("unavailable", **common)
    if f.kind == "blocked" and f.blocked == "blocked_redirect":
        return Robots("unavailable", **common)
    if f.kind == "blocked":
        return Robots("blocked", blocked=f.blocked, **common)
    return Robots("unreachable", **common)  # 5xx (or another code outside 2xx/4xx), refused, timeout


def _parse_robots(body: bytes):
    from protego import Protego

    return Protego.parse(body.decode("utf-8-sig", errors="replace"))  # a byte order mark would hide the first line


def _pattern_expr(path: pl.Expr, pattern: str) -> pl.Expr:
    """Does a normalised path match a normalised robots.txt pattern, as protego's _URLPattern.match does: a prefix;
    `*` any characters; a trailing `$` the end. Every character but letters and digits escaped as \\x{..}."""
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    if "*" not in body and not anchored:
        return path.str.starts_with(body)
    parts = re.sub(r"\*+", "*", body).split("*")
    rx = "^" + ".*".join("".join(c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):x}}}" for c in p)
                         for p in parts) + ("$" if anchored else "")
    return path.str.contains("(?s)" + rx)


def _first_match(path: pl.Expr, patterns: list[str]) -> pl.Expr:
    """Index of the first pattern that matches, null for none."""
    if not patterns:
        return pl.lit(None, dtype=pl.Int32)
    return pl.coalesce([pl.when(_pattern_expr(path, p)).then(pl.lit(i, dtype=pl.Int32))
                        for i, p in enumerate(patterns)])


def normal_paths(urls: pl.Series) -> pl.Series:
    """Each URL's path and query normalised as protego compares them (its `_quote_path`): extracted by a regex
    where the URL is already in normal form, protego's function on the distinct others."""
    from protego._utils import _quote_path

    fast = urls.str.extract(_NORMAL_PATH, 1)
    slow = urls.filter(fast.is_null()).unique()
    if slow.len() == 0:
        return fast
    mapping = {u: _quote_path(u) for u in slow.to_list()}
    return fast.fill_null(urls.replace_strict(mapping, default=None, return_dtype=pl.String))


def robots_decisions(urls: pl.Series, robots: Robots, token: str) -> pl.DataFrame:
    """Per URL of one host: `allowed` (bool) and `robots_rule` ("disallow: /private/" or null)."""
    n = urls.len()
    if robots.status in ("unreachable", "blocked"):
        return pl.DataFrame({"allowed": [False] * n, "robots_rule": [None] * n},
                            schema={"allowed": pl.Boolean, "robots_rule": pl.String})
    rules = robots.rules(token)
    if rules is None:  # protego's internals moved: its own answer, no rule recorded
        parser = robots.parser()
        allowed = [parser.can_fetch(u, token) for u in urls.to_list()]
        return pl.DataFrame({"allowed": allowed, "robots_rule": [None] * n},
                            schema={"allowed": pl.Boolean, "robots_rule": pl.String})
    if not rules:
        return pl.DataFrame({"allowed": [True] * n, "robots_rule": [None] * n},
                            schema={"allowed": pl.Boolean, "robots_rule": pl.String})
    fields = pl.Series([f for f, _ in rules], dtype=pl.String)
    labels = pl.Series([f"{f}: {p}" for f, p in rules], dtype=pl.String)
    df = pl.DataFrame({"p": normal_paths(urls)}).with_columns(i=_first_match(pl.col("p"), [p for _, p in rules]))
    return df.select(
        allowed=(pl.col("i").replace_strict(list(range(len(rules))), fields.to_list(), default=None) != "disallow")
        .fill_null(True),
        robots_rule=pl.col("i").replace_strict(list(range(len(rules))), labels.to_list(), default=None,
                                               return_dtype=pl.String),
    )


# ---- TDMRep ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TdmRep:
    """A host's tdmrep.json: `status` ok | absent (non-2xx) | unreachable | malformed | blocked | not_checked;
    `rules`: [(normalised location, reservation 0|1, policy)] in file order."""

    status: str
    http: int | None = None
    body: bytes | None = None
    error: str | None = None
    fetched_at: str | None = None
    rules: list = dataclasses.field(default_factory=list)

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.body).hexdigest() if self.body is not None else None


def parse_tdmrep(body: bytes) -> list[tuple[str, int, str | None]]:
    """The rules of a tdmrep.json; ValueError (one line) saying why it is malformed."""
    from protego._utils import _quote_pattern

    try:
        doc = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(doc, list):
        raise ValueError(f"not an array of rules (a JSON {type(doc).__name__})")
    rules = []
    for k, rule in enumerate(doc):
        if not isinstance(rule, dict) or not isinstance(rule.get("location"), str) or not rule["location"]:
            raise ValueError(f"rule {k} has no location")
        res = rule.get("tdm-reservation")
        if isinstance(res, bool) or res not in (0, 1):
            raise ValueError(f"rule {k}: tdm-reservation is {json.dumps(res)[:40]}, not 0 or 1")
        pol = rule.get("tdm-policy")
        loc = rule["location"]
        rules.append((_quote_pattern(loc if loc.startswith(("/", "*")) else "/" + loc), int(res),
                      pol if isinstance(pol, str) else None))
    return rules


def tdmrep_of(f: Fetched) -> TdmRep:
    common = dict(http=f.http, error=f.error, fetched_at=f.fetched_at)
    if f.kind == "ok":
        if f.truncated:
            return TdmRep("malformed", body=f.body, **{**common, "error": f"larger than {TDMREP_MAX} bytes"})
        try:
            return TdmRep("ok", body=f.body, rules=parse_tdmrep(f.body), **common)
        except ValueError as e:
            return TdmRep("malformed", body=f.body, **{**common, "error": str(e)})
    if f.kind == "http":
        return TdmRep("absent", **common)
    return TdmRep("blocked" if f.kind == "blocked" else "unreachable", **common)


def tdm_reservations(urls: pl.Series, tdm: TdmRep) -> pl.Series:
    """Per URL of one host: the reservation of the first rule whose location matches (1 or 0), null for none."""
    if tdm.status != "ok" or not tdm.rules:
        return pl.Series([None] * urls.len(), dtype=pl.Int8)
    i = pl.DataFrame({"p": normal_paths(urls)}).select(i=_first_match(pl.col("p"), [r[0] for r in tdm.rules]))["i"]
    return i.replace_strict(list(range(len(tdm.rules))), [r[1] for r in tdm.rules], default=None,
                            return_dtype=pl.Int8)


__all__ = ["REASONS", "ROBOTS_DISALLOWED", "TDM_RESERVED", "ROBOTS_MAX", "TDMREP_MAX", "POLICY_TIMEOUT",
           "DEFAULT_USER_AGENT", "product_token", "contact", "contact_warning", "Fetched", "fetch", "Robots",
           "robots_of", "normal_paths", "robots_decisions", "TdmRep", "parse_tdmrep", "tdmrep_of", "tdm_reservations"]
