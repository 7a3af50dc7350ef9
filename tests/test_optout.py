"""Opt-outs before the download (issue 32, item 1; stages/ingest/optout.py): robots.txt (RFC 9309) and
`/.well-known/tdmrep.json` (W3C TDMRep), fetched once per host per run through the egress policy; excluded URLs
are rejected (`robots_disallowed`, `tdm_reserved`) and never requested; the evidence is recorded per row and in
the run's `optout/` folder.

Loopback only: several `http.server` servers on 127.0.0.1 ports stand for hosts (listed in allow_private_hosts),
each counting the requests it gets per path."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import egress
from stages.ingest import optout
from stages.ingest import policies
from tests.loopback import LoopbackServer

UA = "clipcurate-test/0.1 (+https://example.org/crawler)"
TOKEN = "clipcurate-test"


class Host(LoopbackServer):
    """A loopback host: `files` maps a path to (status, body) (or a callable path -> (status, headers, body));
    other paths ending in .png are PNGs, the rest 404; `paths` counts the requests per path (query left out)."""

    def __init__(self, files: dict | None = None):
        super().__init__(self._answer)
        self.files, self.paths = files or {}, Counter()
        self.key = self.url

    def _answer(self, path: str):
        self.paths[path.split("?")[0]] += 1
        got = self.files.get(path.split("?")[0])
        if callable(got):
            return got(path)
        if got is not None:
            return got[0], {}, got[1]
        if path.endswith(".png"):
            return 200, {"Content-Type": "image/png"}, _png(len(path))
        return 404, {}, b"missing"


def _png(i: int) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (40 + i % 20, 30 + i % 10), (i * 37 % 255, 90, 160)).save(b, "PNG")
    return b.getvalue()


ROBOTS_GROUPS = (b"User-agent: otherbot\nDisallow: /\n\n"
                 b"User-agent: clipcurate-test\nDisallow: /private/\n\n"
                 b"User-agent: *\nDisallow: /img/\n")
TDMREP = b'[{"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": "https://example.org/policy"},' \
         b' {"location": "/", "tdm-reservation": 0}]'


def _policy(*hosts: Host) -> egress.EgressPolicy:
    return egress.EgressPolicy(frozenset(f"127.0.0.1:{h.port}" for h in hosts))


def _settings(**kw) -> optout.Settings:
    return optout.Settings(**{"user_agent": UA, "timeout": 3.0, **kw})


# ---- the whole ingest: one URL list over several hosts --------------------------------------------------------
def test_ingest_never_requests_what_robots_txt_or_tdmrep_exclude(tmp_path, capsys):
    from pipeline import shards
    from pipeline.cli import main as cli_main

    groups = Host({"/robots.txt": (200, ROBOTS_GROUPS)})  # our product token's group: /private/ only
    missing = Host()  # robots.txt 404 ("unavailable": allow all), no tdmrep.json
    broken = Host({"/robots.txt": (500, b"oops")})  # 5xx ("unreachable"): everything disallowed
    reserved = Host({"/.well-known/tdmrep.json": (200, TDMREP)})
    malformed = Host({"/.well-known/tdmrep.json": (200, b"{not json")})
    hosts = [groups, missing, broken, reserved, malformed]
    with groups, missing, broken, reserved, malformed:
        rows = []
        for h, name in zip(hosts, ["groups", "missing", "broken", "reserved", "malformed"]):
            rows += [(f"{h.url}/img/{i}.png", f"{name} img {i}") for i in range(3)]
        rows += [(f"{groups.url}/private/{i}.png", f"groups private {i}") for i in range(2)]
        rows += [(f"{groups.url}/private/0.png", "groups private 0, second caption")]
        rows += [(f"{reserved.url}/reserved/{i}.png", f"reserved reserved {i}") for i in range(2)]
        pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), tmp_path / "u.parquet")
        cfg = tmp_path / "c.toml"
        allowed = ", ".join(f'"127.0.0.1:{h.port}"' for h in hosts)
        cfg.write_text(f'[ingest]\nprocesses = 1\nthreads = 4\ntimeout = 5\nuser_agent = "{UA}"\n'
                       f'allow_private_hosts = [{allowed}]\n')
        code = cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(tmp_path / "u.parquet"), "--run", "r",
                         "--config", str(cfg), "--workers", "0"])
        out, err = capsys.readouterr()
        assert code == 0, err

    # never requested: the excluded paths; each policy file once per host
    assert not any(p.startswith("/private/") for p in groups.paths)
    assert not any(p.startswith("/reserved/") for p in reserved.paths)
    assert set(broken.paths) == {"/robots.txt", "/.well-known/tdmrep.json"}  # no image of it
    for h in hosts:
        assert h.paths["/robots.txt"] == 1 and h.paths["/.well-known/tdmrep.json"] == 1, h.paths
    assert set(groups.agents[:2]) == {UA}  # the policy fetches name the crawler
    assert "warning" not in err  # a contact is named

    stage = tmp_path / "runs" / "r" / "00_ingest"
    kept = pl.concat([pl.read_parquet(p) for p in sorted(stage.glob("part-*.parquet"))], how="diagonal_relaxed")
    rej = pl.concat([pl.read_parquet(p) for p in sorted((stage / "rejected").glob("*.parquet"))],
                    how="diagonal_relaxed")
    reasons = dict(zip(rej["text"], rej["reason"]))
    assert reasons == {**{f"groups private {i}": "robots_disallowed" for i in range(2)},
                       "groups private 0, second caption": "robots_disallowed",
                       **{f"broken img {i}": "robots_disallowed" for i in range(3)},
                       **{f"reserved reserved {i}": "tdm_reserved" for i in range(2)}}
    assert sorted(kept["text"]) == sorted(f"{n} img {i}" for n in ["groups", "missing", "reserved", "malformed"]
                                          for i in range(3))
    # per-row evidence
    ev = {t: (s, r, d) for t, s, r, d in rej.select("text", "robots_status", "robots_rule", "tdm_reservation").rows()}
    assert ev["groups private 1"] == ("ok", "disallow: /private/", None)
    assert ev["broken img 0"] == ("unreachable", None, None)
    assert ev["reserved reserved 0"] == ("unavailable", None, 1)
    kev = {t: (s, r, h, d) for t, s, r, h, d in
           kept.select("text", "robots_status", "robots_rule", "robots_sha256", "tdm_reservation").rows()}
    assert kev["groups img 0"] == ("ok", None, hashlib.sha256(ROBOTS_GROUPS).hexdigest(), None)
    assert kev["missing img 0"] == ("unavailable", None, None, None)
    assert kev["reserved img 0"][3] == 0  # the "/" rule: explicitly not reserved
    assert kev["malformed img 1"][3] is None
    assert kept.schema["tdm_reservation"] == pl.Int8
    m = shards.read_json(str(stage / "_manifest.json"))
    assert m["reasons"] == {"robots_disallowed": 6, "tdm_reserved": 2}
    assert m["urls_downloaded"] == 12  # the URLs requested: 4 hosts x 3 images
    assert m["download"]["optout"]["hosts"] == 5 and m["download"]["robots_disallowed"] == 6
    assert "6 disallowed by robots.txt, 2 reserved by TDMRep" in out

    # the record: hosts.parquet and the fetched files, named by a hash of the host
    rec = tmp_path / "runs" / "r" / "optout"
    hp = pl.read_parquet(rec / "hosts.parquet")
    by = {r["host"]: r for r in hp.iter_rows(named=True)}
    assert set(by) == {h.key for h in hosts}
    assert by[broken.key]["robots_status"] == "unreachable" and by[broken.key]["robots_http"] == 500
    assert by[missing.key]["robots_status"] == "unavailable" and by[missing.key]["robots_http"] == 404
    assert by[malformed.key]["tdmrep_status"] == "malformed" and "not JSON" in by[malformed.key]["tdmrep_error"]
    assert by[reserved.key]["tdmrep_status"] == "ok" and by[reserved.key]["tdm_reserved"] == 2
    assert by[groups.key]["robots_disallowed"] == 2 and by[groups.key]["urls"] == 5
    g = by[groups.key]
    assert (rec / g["robots_file"]).read_bytes() == ROBOTS_GROUPS
    assert g["robots_sha256"] == hashlib.sha256(ROBOTS_GROUPS).hexdigest() and g["robots_fetched_at"]
    assert (rec / by[malformed.key]["tdmrep_file"]).read_bytes() == b"{not json"
    names = [p.name for p in rec.rglob("*") if p.is_file()]
    assert not any("127.0.0.1" in n or str(groups.port) in n for n in names)


# ---- check_urls directly: no img2dataset -----------------------------------------------------------------------
def test_each_policy_file_is_fetched_once_per_host_per_run(tmp_path):
    a = Host({"/robots.txt": (200, b"User-agent: *\nDisallow: /private/\n")})
    b = Host()
    with a, b:
        urls = pl.Series([f"{h.url}/img/{i}.png" for h in (a, b) for i in range(50)]
                         + [f"{a.url}/private/{i}.png" for i in range(5)] + [f"http://127.0.0.1:{a.port}/x.png"])
        got, info = optout.check_urls(urls, _settings(), _policy(a, b), str(tmp_path / "optout"))
        assert info["fetched"] == 2 and info["hosts"] == 2 and info["robots_disallowed"] == 5
        again, info2 = optout.check_urls(urls, _settings(), _policy(a, b), str(tmp_path / "optout"))
        assert info2["fetched"] == 0  # the run's record is reused: once per run
        assert again.equals(got)
        # a record made with a check turned off is completed when the check is on
        only_robots, _ = optout.check_urls(urls, _settings(respect_tdmrep=False), _policy(a, b), str(tmp_path / "o2"))
        _, info3 = optout.check_urls(urls, _settings(), _policy(a, b), str(tmp_path / "o2"))
        assert info3["fetched"] == 2
        assert set(pl.read_parquet(tmp_path / "o2" / "hosts.parquet")["tdmrep_status"]) == {"absent"}
        # the same origin however it is spelled (the default port, the case of the scheme) is one host
        assert optout.origin_key("HTTP://Example.ORG") == optout.origin_key("http://example.org:80")
        assert optout.origin_key("https://example.org") != optout.origin_key("http://example.org")
    for h in (a, b):
        assert h.paths["/robots.txt"] == 3 and h.paths["/.well-known/tdmrep.json"] == 2  # runs o, o2, o2
        assert not any(p.endswith(".png") for p in h.paths)  # checking requests no image
    assert got["optout"].to_list() == [None] * 100 + ["robots_disallowed"] * 5 + [None]


def test_hosts_are_fetched_in_parallel(tmp_path):
    """Each host's robots.txt answers after 0.5 s: 8 hosts take far less than 8 x 0.5 s."""
    import time

    def slow(path):
        time.sleep(0.5)
        return 404, {}, b"no"

    hosts = [Host({"/robots.txt": slow}) for _ in range(8)]
    for h in hosts:
        h.__enter__()
    try:
        urls = pl.Series([f"{h.url}/img/1.png" for h in hosts])
        t0 = time.perf_counter()
        optout.check_urls(urls, _settings(respect_tdmrep=False), _policy(*hosts), None)
        assert time.perf_counter() - t0 < 2.0
    finally:
        for h in hosts:
            h.__exit__()


def test_policy_fetches_obey_the_egress_policy(tmp_path, monkeypatch):
    """A host whose name resolves to a loopback port not allowed: its robots.txt is never requested (no connection
    at all) and its URLs keep the egress reason; a robots.txt redirecting there is refused at the hop."""
    other = Host({"/robots.txt": (200, b"User-agent: *\nAllow: /\n")})
    redirecting = Host({"/robots.txt": lambda p: (302, {"Location": f"{other.url}/robots.txt"}, b"")})
    monkeypatch.setattr(egress, "resolve", lambda host, port: ["127.0.0.1"] if host == "inward.test" else [])
    with other, redirecting:
        urls = pl.Series([f"http://inward.test:{other.port}/img/1.png", f"{redirecting.url}/img/2.png"])
        got, info = optout.check_urls(urls, _settings(), _policy(redirecting), str(tmp_path / "o"))
    assert other.connections == 0 and not other.paths
    assert got["optout"].to_list() == ["blocked_address", "blocked_address"]
    assert info["blocked"] == 2
    hp = pl.read_parquet(tmp_path / "o" / "hosts.parquet")
    assert set(hp["robots_status"]) == {"blocked"} and set(hp["robots_blocked"]) == {"blocked_address"}
    assert set(hp["tdmrep_status"]) == {"not_checked"}  # no second request to a refused host


def test_unreachable_host_is_disallowed_and_checks_can_be_turned_off(tmp_path):
    with Host() as h:
        dead = f"http://127.0.0.1:{h.port}"
    # the port is closed now: connection refused = unreachable = disallow all (RFC 9309 2.3.1.4)
    got, _ = optout.check_urls(pl.Series([f"{dead}/a.png"]), _settings(), egress.EgressPolicy(
        frozenset([f"127.0.0.1:{h.port}"])), None)
    assert got.row(0, named=True)["optout"] == "robots_disallowed"
    assert got.row(0, named=True)["robots_status"] == "unreachable"
    assert "2.3.1.4" in got.row(0, named=True)["message"]

    class Cfg:
        user_agent, respect_robots, respect_tdmrep, timeout = UA, False, False, 5

    with Host({"/robots.txt": (200, b"User-agent: *\nDisallow: /\n")}) as h:
        grouped = pl.DataFrame({"url": [f"{h.url}/a.png"], "caption": ["a"], "caps": ['{"c":["a"]}']})
        bad = pl.DataFrame({"url": [], "caption": [], "status": [], "error_message": []},
                           schema={c: pl.String for c in ("url", "caption", "status", "error_message")})
        keep, bad2, info = optout.apply(grouped, bad, Cfg, _policy(h), None, "caps")
    assert keep.height == 1 and bad2.height == 0 and not h.paths  # off: nothing fetched, nothing excluded
    assert keep["robots_status"].to_list() == [None]


def test_apply_moves_every_caption_of_an_excluded_url(tmp_path):
    with Host({"/robots.txt": (200, b"User-agent: *\nDisallow: /no/\n")}) as h:
        # a run's curated output (text-first): each row names its carry file, which the moved rows keep
        grouped = pl.DataFrame({"url": [f"{h.url}/no/1.png", f"{h.url}/yes/1.png"], "caption": ["a", "c"],
                                "caps": ['{"c":["a","b"]}', '{"c":["c"]}'], "clipcurate_carry": ["00007", "00008"]})
        bad = pl.DataFrame({"url": ["ftp://x"], "caption": ["z"], "status": ["blocked_scheme"],
                            "error_message": ["ftp"], "clipcurate_carry": ["invalid"]})

        class Cfg:
            user_agent, respect_robots, respect_tdmrep, timeout = UA, True, True, 5

        keep, bad2, info = optout.apply(grouped, bad, Cfg, _policy(h), None, "caps")
    assert keep["url"].to_list() == [f"{h.url}/yes/1.png"]
    assert bad2.sort("caption").select("caption", "status").rows() == [
        ("a", "robots_disallowed"), ("b", "robots_disallowed"), ("z", "blocked_scheme")]
    assert bad2.filter(pl.col("caption") == "a")["robots_rule"].to_list() == ["disallow: /no/"]
    assert bad2.sort("caption")["clipcurate_carry"].to_list() == ["00007", "00007", "invalid"]
    assert keep["clipcurate_carry"].to_list() == ["00008"]


# ---- the parsing rules, against hand-written files --------------------------------------------------------------
ROBOTS = b"""# a hand-written robots.txt
User-agent: *
Disallow: /private/
Allow: /private/public/
Disallow: /*.gif$
Disallow: /search?

User-Agent: Clipcurate-Test
Disallow: /cc/
Allow: /cc/open
Disallow: /*/secret
Disallow: /exact$

User-agent: otherbot
Disallow: /
"""
PATHS = ["/", "/private/x.png", "/private/public/x.png", "/a.gif", "/a.gif?x=1", "/a.gifx", "/search?q=1",
         "/search", "/cc/x.png", "/cc/open.png", "/cc", "/x/secret/1.png", "/secret", "/exact", "/exact/1",
         "/%63c/x.png", "/cc/%7Euser", "/caf%C3%A9/x", "/a b.png", "/q?a=%2F&b=c", "/private%2Fx"]


@pytest.mark.parametrize("agent", ["clipcurate-test", "otherbot", "somebot", "CLIPCURATE-TEST"])
def test_robots_decisions_agree_with_protego(agent):
    """The vectorised matching (policies.robots_decisions) says what protego's can_fetch says, URL by URL, for every
    group: ours, another bot's, the * group; product tokens match case-insensitively."""
    from protego import Protego

    parser = Protego.parse(ROBOTS.decode())
    urls = pl.Series([f"http://h.test{p}" for p in PATHS])
    got = policies.robots_decisions(urls, policies.Robots("ok", 200, ROBOTS), agent)
    assert got["allowed"].to_list() == [parser.can_fetch(u, agent) for u in urls.to_list()]
    rules = dict(zip(PATHS, got["robots_rule"].to_list()))
    if agent.lower() == "clipcurate-test":
        assert rules["/cc/x.png"] == "disallow: /cc/" and rules["/cc/open.png"] == "allow: /cc/open"
        assert rules["/private/x.png"] is None  # the * group does not apply when ours exists (RFC 9309 2.2.1)
        assert rules["/x/secret/1.png"] == "disallow: /*/secret"
        assert got["allowed"].to_list()[PATHS.index("/exact")] is False
        assert got["allowed"].to_list()[PATHS.index("/exact/1")] is True
    if agent == "somebot":
        assert rules["/private/public/x.png"] == "allow: /private/public/"  # the longest match wins (2.2.2)


def test_robots_status_rules_follow_rfc9309():
    f = policies.Fetched
    assert policies.robots_of(f("http", 404)).status == "unavailable"  # 2.3.1.3: allow all
    assert policies.robots_of(f("http", 403)).status == "unavailable"
    assert policies.robots_of(f("http", 500)).status == "unreachable"  # 2.3.1.4: disallow all
    assert policies.robots_of(f("http", 503)).status == "unreachable"
    assert policies.robots_of(f("unreachable", error="timeout")).status == "unreachable"
    assert policies.robots_of(f("blocked", blocked="blocked_redirect")).status == "unavailable"  # > 5 redirects
    assert policies.robots_of(f("blocked", blocked="blocked_address")).status == "blocked"
    urls = pl.Series(["http://h.test/a.png", "http://h.test/b/c.png"])
    assert policies.robots_decisions(urls, policies.Robots("unavailable", 404), TOKEN)["allowed"].to_list() == [True] * 2
    assert policies.robots_decisions(urls, policies.Robots("unreachable", 503), TOKEN)["allowed"].to_list() == [False] * 2
    # a byte order mark does not hide the first group
    bom = policies.Robots("ok", 200, b"\xef\xbb\xbfUser-agent: *\nDisallow: /b/\n")
    assert policies.robots_decisions(urls, bom, TOKEN)["allowed"].to_list() == [True, False]
    # an empty file, a file without our group or *: no rule
    assert policies.robots_decisions(urls, policies.Robots("ok", 200, b""), TOKEN)["allowed"].all()
    assert policies.robots_decisions(urls, policies.Robots("ok", 200, b"User-agent: x\nDisallow: /\n"), TOKEN)[
        "allowed"].all()


def test_robots_over_500_kib_parses_the_first_500_kib():
    pad = b"# " + b"x" * 1000 + b"\n"
    head = b"User-agent: *\nDisallow: /early/\n" + pad * 200  # ~200 KB
    body = head + pad * 400 + b"Disallow: /late/\n"  # the late rule lies beyond 500 KiB
    with Host({"/robots.txt": (200, body)}) as h:
        got = policies.fetch(f"{h.url}/robots.txt", _policy(h), UA, 3.0, policies.ROBOTS_MAX)
    assert got.kind == "ok" and got.truncated and len(got.body) == 500 * 1024
    r = policies.robots_of(got)
    d = policies.robots_decisions(pl.Series(["http://h.test/early/1.png", "http://h.test/late/1.png"]), r, TOKEN)
    assert d["allowed"].to_list() == [False, True]


def test_tdmrep_rules():
    rules = policies.parse_tdmrep(b'[{"location": "/a/*.jpg$", "tdm-reservation": 1},'
                                b' {"location": "/a/", "tdm-reservation": 0, "tdm-policy": "https://p"},'
                                b' {"location": "/", "tdm-reservation": 1}]')
    t = policies.TdmRep("ok", 200, b"", rules=rules)
    urls = pl.Series(["http://h.test/a/x.jpg", "http://h.test/a/x.jpg?s=1", "http://h.test/a/x.png",
                      "http://h.test/b.png"])
    # first matching rule in file order decides
    assert policies.tdm_reservations(urls, t).to_list() == [1, 0, 0, 1]
    for bad, why in [(b"{", "not JSON"), (b'{"location": "/"}', "not an array"), (b'[{"tdm-reservation": 1}]',
                     "no location"), (b'[{"location": "/", "tdm-reservation": 2}]', "not 0 or 1"),
                     (b'[{"location": "/", "tdm-reservation": true}]', "not 0 or 1")]:
        got = policies.tdmrep_of(policies.Fetched("ok", 200, bad))
        assert got.status == "malformed" and why in got.error
        assert policies.tdm_reservations(urls, got).to_list() == [None] * 4  # malformed: no reservation
    assert policies.tdmrep_of(policies.Fetched("http", 404)).status == "absent"
    assert policies.tdmrep_of(policies.Fetched("unreachable", error="x")).status == "unreachable"
    big = policies.tdmrep_of(policies.Fetched("ok", 200, b"[" + b" " * 10, truncated=True))
    assert big.status == "malformed"


def test_user_agent_config():
    from pipeline import config
    from pipeline.config import ConfigError

    assert policies.product_token("clipcurate/0.1 (+CONTACT)") == "clipcurate"
    assert policies.contact_warning(policies.DEFAULT_USER_AGENT)  # the default names no contact: a warning
    assert policies.contact_warning("clipcurate/0.1 (+https://example.org/bot)") is None
    assert policies.contact_warning("clipcurate/0.1 (crawler@example.org)") is None
    cfg = config.resolve({"ingest": {}})
    assert cfg["ingest"]["user_agent"] == policies.DEFAULT_USER_AGENT
    assert cfg["ingest"]["respect_robots"] is True and cfg["ingest"]["respect_tdmrep"] is True
    for bad in ["", "/0.1", "clip!curate/1", "bot.v2/1"]:
        with pytest.raises(ConfigError) as e:
            config.resolve({"ingest": {"user_agent": bad}})
        assert "user_agent" in str(e.value) and "\n" not in str(e.value)


def test_default_user_agent_warns_once_for_public_hosts(tmp_path, capsys, monkeypatch):
    """No contact in the user agent: one warning line when the list names a host outside allow_private_hosts (its
    owner is who the contact is for); none for the user's own loopback servers (a demo, a test)."""
    class Cfg:
        user_agent, respect_robots, respect_tdmrep, timeout = policies.DEFAULT_USER_AGENT, True, False, 5

    monkeypatch.setattr(egress, "resolve", lambda host, port: [])  # no DNS: the public host is unreachable
    bad = pl.DataFrame(schema={c: pl.String for c in ("url", "caption", "status", "error_message")})
    with Host() as h:
        grouped = pl.DataFrame({"url": [f"{h.url}/a.png"], "caption": ["a"], "caps": ['{"c":["a"]}']})
        optout.apply(grouped, bad, Cfg, _policy(h), None, "caps")
        assert capsys.readouterr().err == ""
        assert h.agents == [policies.DEFAULT_USER_AGENT]
        grouped = pl.DataFrame({"url": [f"{h.url}/a.png", "http://public.example/b.png"], "caption": ["a", "b"],
                                "caps": ['{"c":["a"]}', '{"c":["b"]}']})
        keep, bad2, _ = optout.apply(grouped, bad, Cfg, _policy(h), None, "caps")
    err = capsys.readouterr().err
    assert err.count("clipcurate: warning: ") == 1 and "contact" in err and err.count("\n") == 1
    assert bad2["status"].to_list() == ["robots_disallowed"]  # no address: unreachable


def test_robots_decisions_agree_with_protego_on_random_files():
    """Seeded random robots.txt files and paths over an alphabet rich in the characters that matter (`*`, `$`,
    `%`, `?`, `=`, `/`): the vectorised matching and protego agree on every URL."""
    import random

    from protego import Protego

    rnd = random.Random(32)
    alphabet = ["a", "b", "/", "*", "$", "%41", "%2F", "?", "=", ".", "-", "~", "é", " "]
    for _ in range(40):
        lines = ["User-agent: *"]
        for _ in range(rnd.randint(1, 8)):
            pat = "/" + "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 5)))
            lines.append(f"{rnd.choice(['Allow', 'Disallow'])}: {pat}")
        body = ("\n".join(lines) + "\n").encode()
        paths = ["/" + "".join(rnd.choice([a for a in alphabet if a != "*"]) for _ in range(rnd.randint(0, 7)))
                 for _ in range(60)]
        urls = [f"http://h.test{p}" for p in paths]
        parser = Protego.parse(body.decode())
        got = policies.robots_decisions(pl.Series(urls), policies.Robots("ok", 200, body), TOKEN)["allowed"].to_list()
        assert got == [parser.can_fetch(u, TOKEN) for u in urls], body
