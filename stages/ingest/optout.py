"""Opt-outs before the download: each host's robots.txt (RFC 9309) and `/.well-known/tdmrep.json` (W3C TDMRep),
fetched once per run, before img2dataset sees the URL list; a URL they exclude is set aside, never requested.

Hosts. A host is an origin, scheme + host + port (`http://a.example` and `http://a.example:80` are one; `https://`
is another: RFC 9309 §2.3 scopes a robots.txt to its protocol, host and port). The URL list's origins are found
with a regex over the URL column; each origin's two files are fetched in a thread pool (`MAX_FETCHERS` at once,
`POLICY_TIMEOUT` seconds each at most), so many hosts are not fetched one after another. Every policy fetch goes
through the project's egress policy (`pipeline.egress.urlopen`: schemes, addresses, `[ingest] allow_private_hosts`,
at most 5 checked redirects) with the crawler's user agent (`[ingest] user_agent`).

What the files say and how they are matched: policies.py (robots.txt by RFC 9309, TDMRep by the W3C report).

Recorded (`write_record`): the run's `optout/` folder holds each fetched file (`robots/<h>.txt`, `tdmrep/<h>.json`,
`<h>` a hash of the origin: a value from the data never becomes a path) and `hosts.parquet`, one row per origin
(statuses, HTTP codes, fetch times, sha256 of the bytes used, file names, counts). A host already in the run's
`hosts.parquet` is not fetched again (once per run: a rerun or a resumed run reuses the recorded files). Each URL's
evidence travels with its rows (`EVIDENCE`): `robots_status`, `robots_rule` (the rule that matched, e.g.
"disallow: /private/", null when none did), `robots_sha256`, `tdm_reservation` (1, 0, or null: no rule). A URL's
reason on a host with rules is the first of optout_rules.BEFORE_DOWNLOAD it breaks (robots_disallowed, then
tdm_reserved); a host with no rule for us gives all its URLs one answer (robots_disallowed when its robots.txt is
unreachable, the egress reason when the policy refuses it).


Matching is vectorised: per host, the URLs' normalised paths are compared with each rule as a polars expression
(`_first_match`); the normalisation is protego's own (`_quote_path`), computed in Python only for the URLs whose
path is not already in normal form (a query, a percent escape, ...) on hosts that have rules for us.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import polars as pl

from pipeline import egress, shards
from pipeline.rules import judge
from stages.ingest.optout_rules import BEFORE_DOWNLOAD, OptoutFacts
from stages.ingest.policies import (DEFAULT_USER_AGENT, POLICY_TIMEOUT, ROBOTS_DISALLOWED, ROBOTS_MAX, TDM_RESERVED,
                                    TDMREP_MAX, Robots, TdmRep, contact_warning, fetch, parse_tdmrep, product_token,
                                    robots_decisions, robots_of, tdm_reservations, tdmrep_of)

log = logging.getLogger("clipcurate.ingest")

MAX_FETCHERS = 32  # policy fetches in flight at once
EVIDENCE = {"robots_status": pl.String, "robots_rule": pl.String, "robots_sha256": pl.String,
            "tdm_reservation": pl.Int8}
HOSTS_FILE = "hosts.parquet"

_ORIGIN = r"(?i)^(https?://[^/?#]+)"


# ---- per host, once per run -----------------------------------------------------------------------------------
def origin_key(origin: str) -> str | None:
    """"scheme://host:port", lower-cased, the default port spelled: one key per origin however a URL writes it."""
    try:
        p = urlsplit(origin)
        port = p.port or egress.DEFAULT_PORTS[p.scheme.lower()]
    except (ValueError, KeyError):
        return None
    if not p.hostname:
        return None
    return f"{p.scheme.lower()}://{egress.host_key(p.hostname, port)}"


def _base_url(key: str) -> str:
    """The origin as a URL to fetch from: the default port left out (a Host header without it, as a browser sends)."""
    scheme = key.split("://", 1)[0]
    default = f":{egress.DEFAULT_PORTS[scheme]}"
    return key[: -len(default)] if key.endswith(default) else key


def host_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclasses.dataclass
class HostPolicy:
    key: str
    robots: Robots
    tdm: TdmRep


def fetch_hosts(keys: list[str], policy: egress.EgressPolicy, user_agent: str, timeout: float,
                robots: bool = True, tdmrep: bool = True) -> dict[str, HostPolicy]:
    """robots.txt and tdmrep.json of each origin, fetched in parallel (`MAX_FETCHERS` at once)."""

    def one(key: str) -> HostPolicy:
        base = _base_url(key)
        r = robots_of(fetch(f"{base}/robots.txt", policy, user_agent, timeout, ROBOTS_MAX)) if robots \
            else Robots("not_checked")
        if r.status == "blocked" or not tdmrep:  # no request to a host the policy refuses
            t = TdmRep("not_checked")
        else:
            t = tdmrep_of(fetch(f"{base}/.well-known/tdmrep.json", policy, user_agent, timeout, TDMREP_MAX))
        return HostPolicy(key, r, t)

    if not keys:
        return {}
    with ThreadPoolExecutor(max_workers=min(MAX_FETCHERS, len(keys)), thread_name_prefix="optout") as pool:
        return {h.key: h for h in pool.map(one, keys)}


# ---- the record ---------------------------------------------------------------------------------------------
def _files(key: str) -> tuple[str, str]:
    h = host_hash(key)
    return f"robots/{h}.txt", f"tdmrep/{h}.json"


HOST_SCHEMA = {
    "host": pl.String, "host_hash": pl.String,
    "robots_status": pl.String, "robots_http": pl.Int32, "robots_fetched_at": pl.String, "robots_sha256": pl.String,
    "robots_bytes": pl.Int64, "robots_truncated": pl.Boolean, "robots_file": pl.String, "robots_error": pl.String,
    "robots_blocked": pl.String,
    "tdmrep_status": pl.String, "tdmrep_http": pl.Int32, "tdmrep_fetched_at": pl.String, "tdmrep_sha256": pl.String,
    "tdmrep_file": pl.String, "tdmrep_error": pl.String,
    "urls": pl.Int64, "robots_disallowed": pl.Int64, "tdm_reserved": pl.Int64,
}


def _host_row(h: HostPolicy) -> dict:
    rf, tf = _files(h.key)
    r, t = h.robots, h.tdm
    return {"host": h.key, "host_hash": host_hash(h.key),
            "robots_status": r.status, "robots_http": r.http, "robots_fetched_at": r.fetched_at,
            "robots_sha256": r.sha256, "robots_bytes": None if r.body is None else len(r.body),
            "robots_truncated": r.truncated, "robots_file": rf if r.body is not None else None,
            "robots_error": r.error, "robots_blocked": r.blocked,
            "tdmrep_status": t.status, "tdmrep_http": t.http, "tdmrep_fetched_at": t.fetched_at,
            "tdmrep_sha256": t.sha256, "tdmrep_file": tf if t.body is not None else None, "tdmrep_error": t.error}


def load_record(out_dir: str) -> dict[str, HostPolicy]:
    """The hosts this run already fetched (its `optout/hosts.parquet` and files): not fetched again."""
    path = shards.join(out_dir, HOSTS_FILE)
    if not shards.exists(path):
        return {}
    got = {}
    for row in pl.from_arrow(shards.read_shard(path)).iter_rows(named=True):
        def body(name):
            return shards.read_bytes(shards.join(out_dir, name)) if name else None

        r = Robots(row["robots_status"], row["robots_http"], body(row["robots_file"]), bool(row["robots_truncated"]),
                   row["robots_error"], row["robots_blocked"], row["robots_fetched_at"])
        tb = body(row["tdmrep_file"])
        t = TdmRep(row["tdmrep_status"], row["tdmrep_http"], tb, row["tdmrep_error"], row["tdmrep_fetched_at"])
        if t.status == "ok" and tb is not None:
            t.rules = parse_tdmrep(tb)
        got[row["host"]] = HostPolicy(row["host"], r, t)
    return got


def write_record(out_dir: str, hosts: dict[str, HostPolicy], counts: pl.DataFrame) -> None:
    """`optout/hosts.parquet` and each host's fetched files (named by a hash of the origin)."""
    shards.makedirs(out_dir)
    for h in hosts.values():
        rf, tf = _files(h.key)
        if h.robots.body is not None:
            shards.write_bytes(h.robots.body, shards.join(out_dir, rf))
        if h.tdm.body is not None:
            shards.write_bytes(h.tdm.body, shards.join(out_dir, tf))
    rows = pl.DataFrame([_host_row(h) for h in hosts.values()],
                        schema={k: v for k, v in HOST_SCHEMA.items() if k not in ("urls", "robots_disallowed",
                                                                                  "tdm_reserved")})
    rows = rows.join(counts, on="host", how="left").with_columns(
        pl.col(c).fill_null(0).cast(pl.Int64) for c in ("urls", "robots_disallowed", "tdm_reserved"))
    shards.write_shard(rows.select(list(HOST_SCHEMA)).sort("host").to_arrow(), shards.join(out_dir, HOSTS_FILE))


# ---- the URL list ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    user_agent: str = DEFAULT_USER_AGENT
    respect_robots: bool = True
    respect_tdmrep: bool = True
    timeout: float = POLICY_TIMEOUT


def check_urls(urls: pl.Series, settings: Settings, policy: egress.EgressPolicy, out_dir: str | None,
               refetch_unreachable: bool = False) -> tuple[pl.DataFrame, dict]:
    """Per URL (in order): `optout` (null, "robots_disallowed", "tdm_reserved" or an egress reason), `message`,
    and the evidence columns (`EVIDENCE`). Fetches what the run's record lacks (and, with `refetch_unreachable`,
    the hosts whose robots.txt it records as unreachable: ingest --retry-failed), writes the record to `out_dir`.
    Returns (that frame, {"hosts", "fetched", "robots_disallowed", "tdm_reserved", "blocked"})."""
    token = product_token(settings.user_agent)
    keys_raw = urls.str.extract(_ORIGIN, 1)
    distinct = keys_raw.drop_nulls().unique().to_list()
    key_of = {o: origin_key(o) for o in distinct}
    keys = keys_raw.replace_strict(key_of, default=None, return_dtype=pl.String)
    wanted = sorted({k for k in key_of.values() if k})
    known = load_record(out_dir) if out_dir else {}

    def lacks(h: HostPolicy) -> bool:  # recorded by a run that did not check what this one checks
        return (settings.respect_robots and h.robots.status == "not_checked") or \
            (settings.respect_tdmrep and h.tdm.status == "not_checked" and h.robots.status != "blocked")

    todo = [k for k in wanted if k not in known or lacks(known[k])
            or (refetch_unreachable and known[k].robots.status == "unreachable")]
    if settings.respect_robots or settings.respect_tdmrep:
        fetched = fetch_hosts(todo, policy, settings.user_agent, settings.timeout,
                              settings.respect_robots, settings.respect_tdmrep)
    else:
        fetched = {k: HostPolicy(k, Robots("not_checked"), TdmRep("not_checked")) for k in todo}
    hosts = {**known, **fetched}
    n = urls.len()
    out = pl.DataFrame({"url": urls, "_key": keys, "_row": pl.int_range(n, eager=True)})

    def effective(h: HostPolicy) -> tuple[Robots, TdmRep]:
        return (h.robots if settings.respect_robots else Robots("not_checked"),
                h.tdm if settings.respect_tdmrep else TdmRep("not_checked"))

    # hosts whose every URL gets the same answer (no robots rule for us, no TDMRep rule: most hosts) are answered
    # by one join; the others by rule set (hosts serving the same files share one: a CMS's default robots.txt),
    # the rules as expressions over all those hosts' URLs at once
    same, ruled = [], {}
    for key in wanted:
        r, t = effective(hosts[key])
        if (r.status != "ok" or r.rules(token) == []) and not (t.status == "ok" and t.rules):
            why = r.blocked if r.status == "blocked" else ROBOTS_DISALLOWED if r.status == "unreachable" else None
            msg = (f"robots.txt of {key}: {r.error}" if r.status == "blocked" else
                   f"robots.txt of {key} unreachable ({r.error}): RFC 9309 2.3.1.4 disallows all"
                   if r.status == "unreachable" else None)
            same.append({"_key": key, "optout": why, "message": msg, "robots_status": r.status, "robots_rule": None,
                         "robots_sha256": r.sha256, "tdm_reservation": None})
        else:
            ruled.setdefault((r.status, r.sha256, r.error, t.status, t.sha256), []).append(key)
    answers = pl.DataFrame(same, schema={"_key": pl.String, "optout": pl.String, "message": pl.String, **EVIDENCE})
    ruled_keys = [k for ks in ruled.values() for k in ks]
    parts = [out.filter(~pl.col("_key").is_in(ruled_keys).fill_null(True))
             .join(answers, on="_key", how="left").drop("url", "_key")]
    by_host = out.filter(pl.col("_key").is_in(ruled_keys)).partition_by("_key", as_dict=True) if ruled else {}
    for ks in ruled.values():
        group = pl.concat([by_host[(k,)] for k in ks if (k,) in by_host])
        r, t = effective(hosts[ks[0]])
        dec = robots_decisions(group["url"], r, token) if r.status != "not_checked" else \
            pl.DataFrame({"allowed": [True] * group.height, "robots_rule": [None] * group.height},
                         schema={"allowed": pl.Boolean, "robots_rule": pl.String})
        res = tdm_reservations(group["url"], t)
        rmsg = (f"robots.txt unreachable ({r.error}): RFC 9309 2.3.1.4 disallows all" if r.status == "unreachable"
                else f"robots.txt disallows it for {token}")
        facts = OptoutFacts(robots_allowed=dec["allowed"].fill_null(True).to_numpy(), tdm_reservation=res.to_numpy())
        why = pl.from_arrow(judge(BEFORE_DOWNLOAD, facts, group.height)[0]).alias("optout")
        msg = pl.when(pl.col("optout") == ROBOTS_DISALLOWED).then(
            pl.lit(rmsg) + pl.when(pl.col("robots_rule").is_not_null())
            .then(pl.lit(" (") + pl.col("robots_rule") + pl.lit(")")).otherwise(pl.lit(""))) \
            .when(pl.col("optout") == TDM_RESERVED).then(pl.lit("/.well-known/tdmrep.json reserves TDM rights"))
        parts.append(pl.concat([group.select("_row"), dec, res.alias("tdm").to_frame(), why.to_frame()],
                               how="horizontal").select(
            "_row", optout=pl.col("optout").cast(pl.String), message=msg.cast(pl.String),
            robots_status=pl.lit(r.status, pl.String), robots_rule=pl.col("robots_rule"),
            robots_sha256=pl.lit(r.sha256, pl.String), tdm_reservation=pl.col("tdm").cast(pl.Int8)))
    result = pl.concat(parts).sort("_row").drop("_row")
    counts = (pl.DataFrame({"host": keys, "o": result["optout"]}).drop_nulls("host").group_by("host")
              .agg(urls=pl.len(), robots_disallowed=(pl.col("o") == ROBOTS_DISALLOWED).sum(),
                   tdm_reserved=(pl.col("o") == TDM_RESERVED).sum()))
    if out_dir and (fetched or wanted):
        write_record(out_dir, {k: hosts[k] for k in sorted(set(wanted) | set(known))}, counts)
    info = {"hosts": len(wanted), "fetched": len(fetched),
            "robots_disallowed": int((result["optout"] == ROBOTS_DISALLOWED).sum()),
            "tdm_reserved": int((result["optout"] == TDM_RESERVED).sum()),
            "blocked": int(result["optout"].is_in(egress.REASONS).sum())}
    return result, info


def _public_hosts(urls: pl.Series, policy: egress.EgressPolicy) -> bool:
    """Does the list name a host outside `allow_private_hosts`? The missing contact is for the owners of those
    (a demo's or a test's loopback server is the user's own: no warning)."""
    for origin in urls.str.extract(_ORIGIN, 1).drop_nulls().unique().to_list():
        key = origin_key(origin)
        if key and key.split("://", 1)[1] not in policy.allow_private_hosts:
            return True
    return False


def settings_of(cfg) -> Settings:
    """The opt-out settings of an `IngestStage.Config`."""
    return Settings(cfg.user_agent, cfg.respect_robots, cfg.respect_tdmrep, min(float(cfg.timeout), POLICY_TIMEOUT))


def apply(grouped: pl.DataFrame, bad: pl.DataFrame, cfg, policy: egress.EgressPolicy, out_dir: str | None,
          captions_col: str) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """The grouped URL list (one row per URL, its captions as JSON in `captions_col`) with the URLs the opt-outs
    exclude moved to the rejected rows (one per caption, `status` the reason, `error_message` why), and the
    evidence columns on both. No request for a moved URL is ever made."""
    settings = settings_of(cfg)
    warn = contact_warning(settings.user_agent)
    if warn and (settings.respect_robots or settings.respect_tdmrep) and _public_hosts(grouped["url"], policy):
        print(f"clipcurate: warning: {warn}", file=sys.stderr)
    if grouped.height and (settings.respect_robots or settings.respect_tdmrep):
        checked, info = check_urls(grouped["url"], settings, policy, out_dir)
    else:
        checked = pl.DataFrame({"optout": [None] * grouped.height, "message": [None] * grouped.height},
                               schema={"optout": pl.String, "message": pl.String}).with_columns(
            **{c: pl.lit(None, t) for c, t in EVIDENCE.items()})
        info = {"hosts": 0, "fetched": 0, "robots_disallowed": 0, "tdm_reserved": 0, "blocked": 0}
    g = pl.concat([grouped, checked], how="horizontal")
    keep = g.filter(pl.col("optout").is_null()).drop("optout", "message")
    out = g.filter(pl.col("optout").is_not_null())
    bad = bad.with_columns(**{c: pl.lit(None, t) for c, t in EVIDENCE.items() if c not in bad.columns})
    if out.height:
        caps = pl.col(captions_col).str.json_decode(pl.Struct({"c": pl.List(pl.String)})).struct.field("c")
        moved = (out.with_columns(caption=caps).explode("caption")
                 .with_columns(status=pl.col("optout"), error_message=pl.col("message")))
        bad = pl.concat([bad, moved.select(bad.columns)], how="vertical_relaxed")
    return keep, bad, info


def check_settings(user_agent: str) -> None:
    """A config's user agent must start with a product token (StageError-free: ValueError for the config)."""
    product_token(user_agent)


__all__ = ["EVIDENCE", "HOSTS_FILE", "origin_key", "host_hash", "HostPolicy", "fetch_hosts", "load_record",
           "write_record", "Settings", "check_urls", "settings_of", "apply", "check_settings"]
