"""ingest's config (`[ingest]`), in a module of its own so that the download code can name its type without
importing the stage (the package's __init__), which imports the download code."""

from __future__ import annotations

import dataclasses

from pipeline import egress
from pipeline.config import ConfigError, check_ranges
from stages.ingest.policies import DEFAULT_USER_AGENT, product_token


@dataclasses.dataclass
class IngestConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    resize_mode: str = "no"  # img2dataset's: no | border | keep_ratio | center_crop
    image_size: int = 256
    encode_format: str = "jpg"
    processes: int = 0  # 0 = cores
    threads: int = 32
    shard_size: int = 10000  # samples per img2dataset shard (= our shard)
    timeout: int = 10
    retries: int = 0
    serve_dir: str = ""  # a demo world's www/, served on loopback as its host during the download
    # exact "host:port" pairs exempt from the egress policy's address rule (pipeline/egress.py): a loopback
    # or LAN server you mean to download from. Nothing else is exempt, and only from that rule.
    allow_private_hosts: list = dataclasses.field(default_factory=list)
    # opt-outs before the download (optout.py): robots.txt groups are matched against the product token (the
    # part before "/"); name a contact (a URL or e-mail after "+") so that site owners can reach you
    user_agent: str = DEFAULT_USER_AGENT
    respect_robots: bool = True  # robots.txt (RFC 9309): a disallowed URL is `robots_disallowed`, never fetched
    respect_tdmrep: bool = True  # /.well-known/tdmrep.json (W3C TDMRep): a reserved URL is `tdm_reserved`
    # X-Robots-Tag directives that refuse an image response (`x_robots_tag`), for every crawler or for our
    # product token ("clipcurate: noai"); checked by img2dataset on the response, before its body is read.
    # [] = not checked. img2dataset's default list.
    x_robots_directives: list = dataclasses.field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    # a 429 or 503 answer: wait (its Retry-After, else 1, 2, 4 ... s; at most backoff_max_wait) and ask again,
    # up to backoff_tries times a request (guard.RetryAfterHandler); 0 = off
    backoff_tries: int = 3
    backoff_max_wait: float = 60.0
    # politeness per host (scheme's default port or the URL's), held across img2dataset's processes and
    # threads (hostlimit.py): at most per_host_concurrency open requests, request starts at most
    # per_host_rps a second; 0 = no limit. Hosts in allow_private_hosts are your own servers and exempt,
    # unless per_host_limit_private.
    per_host_concurrency: int = 2
    per_host_rps: float = 2.0  # request starts a second per host; 0 = no spacing
    per_host_limit_private: bool = False  # true: the limits hold for allow_private_hosts too

    def __post_init__(self):
        check_ranges("ingest", self, image_size=(1, None), processes=(0, None), threads=(1, None),
                     shard_size=(1, None), timeout=(1, None), retries=(0, None), backoff_tries=(0, None),
                     backoff_max_wait=(0, None), per_host_concurrency=(0, None), per_host_rps=(0, None))
        for entry in self.allow_private_hosts:
            try:
                egress.parse_host_port(entry)
            except ValueError as e:
                raise ConfigError(f"config [ingest] allow_private_hosts: {e}") from None
        try:
            product_token(self.user_agent)
        except (ValueError, AttributeError, TypeError) as e:
            raise ConfigError(f"config [ingest] user_agent: {e}") from None
        if not all(isinstance(d, str) and d.strip() for d in self.x_robots_directives):
            raise ConfigError(f"config [ingest] x_robots_directives = {self.x_robots_directives!r}: give a list "
                              "of directive names (e.g. [\"noai\", \"noimageai\"]), or [] to not check them")

    def egress_policy(self, pinned: dict | None = None) -> egress.EgressPolicy:
        """The policy every fetch of this ingest obeys; `pinned`: "host:port" -> (ip, port), as the demo's
        loopback server is reached (download.py)."""
        return egress.EgressPolicy(frozenset(self.allow_private_hosts), pinned=pinned or {})
