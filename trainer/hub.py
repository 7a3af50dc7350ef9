"""Pretrained open_clip weights in Hugging Face's cache: which files a model needs, whether the cache has them,
and `clipcurate fetch-model`, which puts them there through the egress policy.

Where the files are is open_clip's answer, not ours: an `hf-hub:ORG/NAME` model is `open_clip_config.json` plus
its weights (`open_clip_model.safetensors`, else `open_clip_pytorch_model.bin`) in the hub repo ORG/NAME; a
model named by open_clip tag (`ViT-L-14` + `openai`) has its weights in the repo its `hf_hub` entry names
(open_clip/pretrained.py; every one of open_clip 3.3's 196 tags has one), the .safetensors twin first, as open_clip
tries it. The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub` (`~/.cache/huggingface/hub`), read when asked (not
when huggingface_hub was imported), laid out as the hub lays it out:
`models--ORG--NAME/{refs/main, snapshots/<rev>/FILE}`.

Loading never downloads (models.load_pretrained reads the cache with huggingface_hub held offline): a run that
scores a pool makes no request, and a model missing from the cache is one line naming
`clipcurate fetch-model NAME [--pretrained TAG]`. `fetch` downloads, with huggingface_hub's progress bars,
through a client from pipeline/egress_httpx.py: every request and redirect hop checked by the egress policy,
every connection made to a checked address. Xet transfers (hf_xet, Rust code with its own connections, out
of that client's reach) are switched off while fetching: xet-backed files come over plain HTTPS instead. A tag
whose weights are only a URL is fetched with `egress.urlopen` into the cache folder, where open_clip's own
URL download looks for it (`<cache>/<file name>`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import re
from urllib.error import URLError

from pipeline import egress
from pipeline.config import ConfigError

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"  # open_clip's hub layout (open_clip/factory.py _get_hf_config)
WEIGHTS_FILE = "open_clip_pytorch_model.bin"  # open_clip.constants.HF_WEIGHTS_NAME
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")  # the hub's ORG/NAME
TRUE = ("1", "on", "yes", "true")


def fetch_command(name: str, tag: str = "") -> str:
    """The command that puts a model in the cache, as the one-line errors name it."""
    return f"clipcurate fetch-model {name}" + (f" --pretrained {tag}" if tag else "")


# ---- where ----------------------------------------------------------------------------------------
def cache_dir() -> str:
    """huggingface_hub's cache folder, from the environment as it is now (its constants are read at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def endpoint() -> str:
    """The hub's address: $HF_ENDPOINT (a mirror), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now, or when huggingface_hub was imported."""
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    if env in TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def held_offline():
    """huggingface_hub makes no request while inside (its session refuses every one and hf_hub_download falls
    back to the cache): how open_clip's own download calls become cache look-ups when loading."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# ---- what -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """What a (model, pretrained) pair loads, resolved without touching the network or the cache."""

    name: str  # as given: "ViT-L-14", "hf-hub:apple/DFN-public", "clipcurate-tiny"
    pretrained: str  # open_clip's tag (as open_clip cleans it), a weights file, or "" (random weights)
    kind: str  # "hf-hub" | "tag" | "file" | "none"
    repo_id: str = ""  # the hub repo holding the files ("hf-hub", "tag")
    wanted: tuple[tuple[str, ...], ...] = ()  # per file needed, its candidate names in open_clip's order
    url: str = ""  # a tag whose weights are a plain URL
    quick_gelu: bool = False  # the tag's weights were trained with QuickGELU and the config lacks it

    @property
    def fetch_command(self) -> str:
        return fetch_command(self.name, self.pretrained if self.kind == "tag" else "")


def _weights_candidates(filename: str) -> tuple[str, ...]:
    """open_clip's order: the .safetensors twin of a .bin/.pth first, then the file itself."""
    from open_clip import pretrained as oc_pretrained

    try:
        safe = tuple(oc_pretrained._get_safe_alternatives(filename)) if oc_pretrained._has_safetensors else ()
    except AttributeError:  # another open_clip: the rule as 3.3 has it
        safe = ("open_clip_model.safetensors",) if filename == WEIGHTS_FILE else (
            (filename[:-4] + ".safetensors",) if filename.endswith((".bin", ".pth")) else ())
    return (*safe, filename)


def _looks_like_path(s: str) -> bool:
    return "/" in s or os.sep in s or s.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def plan(name: str, pretrained: str = "") -> Source:
    """The Source of `name` + `pretrained`, or a one-line ConfigError (unknown model, unknown tag, no such file).
    The model's configs must be registered first (models.register_configs)."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    name, pretrained = (name or "").strip(), (pretrained or "").strip()
    if name.startswith(HUB_PREFIX):
        repo = name[len(HUB_PREFIX):]
        if not REPO_ID.fullmatch(repo):
            raise ConfigError(f"model {name!r}: expected hf-hub:ORG/NAME (e.g. hf-hub:apple/DFN-public)")
        if pretrained:
            raise ConfigError(f"model {name} names its own weights (open_clip ignores `pretrained` for hf-hub: "
                              f"models); leave pretrained empty, not {pretrained!r}")
        return Source(name, "", "hf-hub", repo, ((CONFIG_FILE,), _weights_candidates(WEIGHTS_FILE)))
    if name not in open_clip.list_models():
        raise ConfigError(f"unknown model {name!r}: give an open_clip model name (e.g. ViT-B-32, ViT-L-14; "
                          f"`open_clip.list_models()`), hf-hub:ORG/NAME, or one of clipcurate-tiny, clipcurate-small")
    if not pretrained:
        return Source(name, "", "none")
    cfg = oc_pretrained.get_pretrained_cfg(name, pretrained)
    if cfg:
        tag = oc_pretrained._clean_tag(pretrained)
        model_cfg = open_clip.get_model_config(name) or {}
        quick = bool(cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu", False)
        if cfg.get("hf_hub"):
            repo, filename = posixpath.split(cfg["hf_hub"])  # "ORG/NAME/" (default file) or "ORG/NAME/FILE"
            return Source(name, tag, "tag", repo, (_weights_candidates(filename or WEIGHTS_FILE),), quick_gelu=quick)
        return Source(name, tag, "tag", url=cfg.get("url", ""), quick_gelu=quick)
    if os.path.isfile(pretrained):
        return Source(name, os.path.abspath(pretrained), "file")
    if _looks_like_path(pretrained):
        raise ConfigError(f"pretrained weights file {pretrained} does not exist (give an open_clip tag of {name}, "
                          "or a weights file)")
    tags = open_clip.list_pretrained_tags_by_model(name)
    listed = ", ".join(tags) if tags else "none (its weights can only come from a file)"
    raise ConfigError(f"model {name} has no pretrained tag {pretrained!r}; its tags: {listed}")


# ---- is it here -----------------------------------------------------------------------------------
def _url_target(url: str, folder: str) -> str:
    """Where open_clip's URL download (`download_pretrained_from_url(url, cache_dir)`) keeps a file."""
    return os.path.join(folder, os.path.basename(url))


def cached_files(source: Source, folder: str | None = None) -> list[str] | None:
    """Local paths of every file `source` needs (per file the first candidate the cache has, as open_clip finds
    it offline), or None when one is missing. No request is made."""
    from huggingface_hub import try_to_load_from_cache

    folder = folder or cache_dir()
    if source.kind == "file":
        return [source.pretrained]
    if source.kind == "none":
        return []
    if source.url and not source.repo_id:
        path = _url_target(source.url, folder)
        return [path] if os.path.isfile(path) else None
    out = []
    for group in source.wanted:
        hit = None
        for filename in group:
            p = try_to_load_from_cache(source.repo_id, filename, cache_dir=folder)
            if isinstance(p, str) and os.path.isfile(p):
                hit = p
                break
        if hit is None:
            return None
        out.append(hit)
    return out


def missing_error(source: Source, folder: str | None = None) -> ConfigError:
    """One line naming the command that fetches the model (loading never downloads)."""
    what = f"model {source.name}" + (f" ({source.pretrained})" if source.kind == "tag" else "")
    return ConfigError(f"{what} is not in the Hugging Face cache {folder or cache_dir()} and a run never downloads"
                       f"{' (HF_HUB_OFFLINE=1)' if offline() else ''}: fetch it first with `{source.fetch_command}` "
                       "where the hub is reachable, or point HF_HOME at a cache that has it")


# ---- fetching through the egress policy ------------------------------------------------------------
def _refuse_async():
    raise egress.Blocked("blocked_address", "huggingface_hub's async client is not guarded by the egress policy")


@contextlib.contextmanager
def guarded_hub(policy: egress.EgressPolicy = egress.DEFAULT_POLICY, resolver: egress.Resolver | None = None):
    """Inside, huggingface_hub sends every request through `egress_httpx.guarded_client(policy)` (its own request
    hook kept: offline mode, headers), its async client refuses, and Xet transfers are off. Restored on exit."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    from pipeline.egress_httpx import guarded_client

    saved = (_http._GLOBAL_CLIENT_FACTORY, _http._GLOBAL_ASYNC_CLIENT_FACTORY, constants.HF_HUB_DISABLE_XET)
    _http.set_client_factory(lambda: guarded_client(policy, resolver, request_hooks=[_http.hf_request_event_hook],
                                                    timeout=None))
    _http.set_async_client_factory(_refuse_async)
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        _http.set_client_factory(saved[0])  # closes our client
        _http.set_async_client_factory(saved[1])
        constants.HF_HUB_DISABLE_XET = saved[2]


def _download_hub_file(source: Source, group: tuple[str, ...], folder: str, where: str) -> str:
    """The first candidate of `group` the hub has, downloaded into the cache (hf_hub_download's progress bar)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for i, filename in enumerate(group):
        try:
            return hf_hub_download(source.repo_id, filename, cache_dir=folder, endpoint=where,
                                   library_name="open_clip")
        except RemoteEntryNotFoundError:
            if i == len(group) - 1:
                raise ConfigError(f"fetch-model {source.name}: {where}/{source.repo_id} has none of "
                                  f"{', '.join(group)}; is it an open_clip model?") from None
    raise AssertionError("unreachable")


def _download_url(source: Source, folder: str, policy: egress.EgressPolicy, resolver) -> str:
    """A tag's plain-URL weights, through `egress.urlopen`, into the place open_clip looks for them."""
    from tqdm import tqdm

    target = _url_target(source.url, folder)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{target}.{os.getpid()}.incomplete"
    try:
        with egress.guarded_opener(policy, resolver).open(source.url, timeout=30) as r, open(tmp, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(target)) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def fetch(source: Source, policy: egress.EgressPolicy = egress.DEFAULT_POLICY, resolver: egress.Resolver | None = None,
          folder: str | None = None) -> tuple[list[str], bool]:
    """(local paths, downloaded?) of every file `source` needs: from the cache when it has them, else downloaded
    through the egress policy. One-line ConfigError for what the user can fix (offline, refused, no such repo)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    folder = folder or cache_dir()
    have = cached_files(source, folder)
    if have is not None:
        return have, False
    if offline():
        raise ConfigError(f"model {source.name} is not in the Hugging Face cache {folder}, and HF_HUB_OFFLINE=1 forbids "
                          f"downloading it: run `{source.fetch_command}` without HF_HUB_OFFLINE, where the hub is reachable")
    by_url = bool(source.url and not source.repo_id)
    where = source.url if by_url else endpoint()
    what = f"fetch-model {source.name}"
    try:
        if by_url:
            return [_download_url(source, folder, policy, resolver)], True
        with guarded_hub(policy, resolver):
            return [_download_hub_file(source, group, folder, where) for group in source.wanted], True
    except egress.Blocked as e:
        raise ConfigError(f"{what}: refused by the egress policy: {e} (a private hub mirror must be allowed: "
                          "--allow-private-host HOST:PORT)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{what}: {where} has no repository {source.repo_id} (or it is gated/private: log in with "
                          "`hf auth login`)") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{what}: {where} answered {str(e).splitlines()[0][:200]}") from None
    except (LocalEntryNotFoundError, httpx2.HTTPError, URLError, OSError) as e:  # no network, DNS, TLS, disk
        cause = e.__cause__ or e
        raise ConfigError(f"{what}: cannot download from {where}: {type(cause).__name__}: "
                          f"{str(cause).splitlines()[0][:200] if str(cause) else 'no detail'}") from None
