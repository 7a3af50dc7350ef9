"""img2dataset's fetches under the egress policy (pipeline/egress.py).

img2dataset 1.47.0 fetches in `img2dataset.downloader.download_image` with `urllib.request.urlopen`, in worker
processes that `multiprocessing_distributor` starts with the *spawn* context: nothing patched in this process
reaches them. What does reach them is the `Downloader` object itself, pickled into every task. So:

- `GuardedDownloader` (a subclass of img2dataset's `Downloader`, importable from this module, so it pickles by
  reference) carries the policy, and in whichever process runs a shard installs the guarded opener
  (`egress.install`: `urllib.request.install_opener`) before delegating to img2dataset's own code. Its
  `urlopen` then resolves, checks and connects through the policy, follows at most 5 checked redirects and no
  proxy. A refusal is an exception like any failed fetch: img2dataset records `str(err)`, "blocked_address:
  ...", as the row's `error_message`, and ingest's conversion turns that into the reason `blocked_address`.
- `guarded_downloads(policy)`: while it is open, `img2dataset.main.download` builds a GuardedDownloader where
  it builds its `Downloader` (it looks the name up in `img2dataset.main` at call time).

Both rely on img2dataset's internals, so the version is pinned (pyproject.toml, requirements.lock) and checked
here; tests/test_hostile_egress.py fails if the hook stops being called (a redirect to a loopback port that is
not allowed would then be followed).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from contextlib import contextmanager

from img2dataset.downloader import Downloader

from pipeline import egress
from pipeline.stage import StageError

PINNED_VERSION = "1.47.0"  # what this hook was written against: keep in step with pyproject.toml
# the module, not `img2dataset.main` the function that the package's __init__ exports under the same name
i2d_main = importlib.import_module("img2dataset.main")


class GuardedDownloader(Downloader):
    """img2dataset's Downloader, fetching through the egress policy in the process that runs the shard."""

    def __init__(self, *args, egress_policy: egress.EgressPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.egress_policy = egress_policy

    def __call__(self, row):
        egress.install(self.egress_policy)  # this process's urlopen: cheap, and idempotent per shard
        return super().__call__(row)


def check_version() -> None:
    """One line when the installed img2dataset is not the one the hook was written against: its fetch path may
    have moved, and a download that silently bypasses the policy is worse than none."""
    got = importlib.metadata.version("img2dataset")
    if got != PINNED_VERSION:
        raise StageError(f"ingest: img2dataset {got} is installed, but clipcurate's egress guard is written against "
                         f"img2dataset=={PINNED_VERSION}: pip install 'img2dataset=={PINNED_VERSION}'")


@contextmanager
def guarded_downloads(policy: egress.EgressPolicy):
    """While open, `img2dataset.download(...)` builds a GuardedDownloader carrying `policy`. Yields the list of
    downloaders built, so the caller can tell that the download went through the hook."""
    check_version()
    built: list[GuardedDownloader] = []

    def make(*args, **kwargs):
        d = GuardedDownloader(*args, egress_policy=policy, **kwargs)
        built.append(d)
        return d

    stock = i2d_main.Downloader
    i2d_main.Downloader = make
    try:
        yield built
    finally:
        i2d_main.Downloader = stock
