"""Reading the URL list (Parquet, CSV, TSV, gzipped or not) and grouping it by URL before the download: one
img2dataset row per unique valid URL with its distinct captions as JSON; malformed URLs, URLs the egress policy
refuses without a request (pipeline/egress.py: another scheme, user@host, a literal internal address), rows that
are not UTF-8 and repeated (url, caption) rows set aside as rejected rows with their reason."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import polars as pl
import pyarrow as pa

from pipeline import egress, schema
from pipeline.errors import StageError

CAPTIONS_COL = "clipcurate_captions"
DUPLICATE = "duplicate"  # reason of a repeated (url, caption) row: DUPLICATE_REASON
# one wording wherever the repeat is found: in a URL list (the first row is kept) or in a crawl used in place (the
# kept copy is chosen by content, then position: not always the earlier one)
DUPLICATE_MESSAGE = "same url and caption as another row"
DUPLICATE_REASON = f"{DUPLICATE}: {DUPLICATE_MESSAGE}"
NOT_AN_IMAGE = "not_an_image"  # reason of a response that is no image (an HTML page under a .jpg name): guard.py
# the error of an image response whose tdm-reservation header is 1 (guard.TdmHeaderProcessor); ingest's reason:
# tdm_reserved, as for a path tdmrep.json reserves
TDM_HEADER_ERROR = "tdm_reserved: the image response's tdm-reservation header is 1"
VALID_URL = r"(?i)^https?://[^\s/:?#]+(:\d+)?([/?#]\S*)?$"  # schemes are case-insensitive (RFC 3986 3.1)


def read_url_list(path: str, url_col: str = "url", caption_col: str = "caption") -> pl.DataFrame:
    """Parquet, CSV, TSV or TSV.gz with a url column and a caption (or text) column."""
    p = str(path)
    if not Path(p).exists() and "://" not in p:
        raise StageError(f"ingest: URL list {p} does not exist")
    low = p.lower()
    try:
        if low.endswith(".parquet"):
            df = _read_parquet_list(p)
        elif low.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            df = _read_text_list(p, "\t", None)
        elif low.endswith((".csv", ".csv.gz")):
            df = _read_text_list(p, ",", '"')
        else:
            raise StageError(f"ingest: {p}: unknown format (use .parquet, .csv, .tsv or .tsv.gz)")
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StageError(f"ingest: cannot read URL list {p}: {_where_it_breaks(p) or first}") from None
    if caption_col not in df.columns and caption_col == "caption" and "text" in df.columns:
        caption_col = "text"
    missing = [(c, key) for c, key in ((url_col, "url_col"), (caption_col, "caption_col")) if c not in df.columns]
    if missing:
        names = " or ".join(f"'{c}'" for c, _ in missing)
        hints = []
        for c, key in missing:
            hint = _column_hint(df.columns, c, key)
            if key == "caption_col" and hint.startswith("name the column") and c == "caption":
                hint = _column_hint(df.columns, "text", key)  # `text` is accepted for captions too
            if hint not in hints:
                hints.append(hint)
        raise StageError(f"ingest: URL list {p} has no column {names} (columns: {_shown(df.columns)}); "
                         + "; ".join(hints))
    out = df.select(pl.col(url_col).cast(pl.String).alias("url"), pl.col(caption_col).cast(pl.String).alias("caption"))
    bad = [f"_bad_{c}" for c in (url_col, caption_col) if f"_bad_{c}" in df.columns]
    if bad:
        out = out.with_columns(pl.any_horizontal([df[c] for c in bad]).alias(BAD_TEXT_COL))
    return out


def _shown(columns: list[str], n: int = 6) -> str:
    cut = [c if len(c) <= 40 else c[:37] + "..." for c in columns[:n]]
    return ", ".join(cut) + (f", ... ({len(columns)} columns)" if len(columns) > n else "")


def _column_hint(columns: list[str], wanted: str, key: str) -> str:
    """What to do when a column is missing: a header that is data, a name in another case, another separator."""
    if any("://" in c for c in columns):
        return "its first line looks like data, not a header: add a header line naming the columns (url, caption)"
    same = [c for c in columns if c.lower() == wanted.lower()]
    if same:
        return f'name it in the config: [ingest] {key} = "{same[0]}"'
    if len(columns) == 1 and any(sep in columns[0] for sep in ("\t", ",", ";", "|")):
        return "its lines are not split on the separator its extension says (.csv: comma, .tsv: tab): rename the file"
    return f'name the column to use in the config: [ingest] {key} = "..."'


def _where_it_breaks(p: str) -> str | None:
    """The first line of a CSV/TSV whose field count differs from the header's (polars names no line). Only read
    on the error path."""
    import csv
    import gzip

    low = p.lower()
    if not low.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")) or "://" in p:
        return None
    sep = "," if ".csv" in low else "\t"
    opener = gzip.open if low.endswith(".gz") else open
    try:
        with opener(p, "rt", encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f, delimiter=sep, quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE)
            header = next(reader, [])
            for row in reader:
                if len(row) != len(header):
                    hint = ("quote captions that hold a comma, or write a TSV" if sep == "," else
                            "a caption holds a tab: remove tabs from captions")
                    return (f"line {reader.line_num} has {len(row)} fields where the header has {len(header)} "
                            f"({hint})")
    except (OSError, csv.Error):
        return None
    return None


BAD_TEXT_COL = "_not_utf8"  # rows of a URL list whose url or caption bytes are not valid UTF-8


def _with_bad_text(table: pa.Table) -> pl.DataFrame:
    """Every string/binary column lossy-decoded, plus `_bad_<col>` flags where a value was not UTF-8."""
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type) \
                or pa.types.is_large_binary(col.type):
            fixed, bad = schema.lossy_utf8(col)
            cols[name], cols[f"_bad_{name}"] = fixed, pa.array(bad, pa.bool_())
        else:
            cols[name] = col
    return pl.from_arrow(pa.table(cols))


def _read_text_list(p: str, sep: str, quote: str | None) -> pl.DataFrame:
    """CSV/TSV as strings. A crawl's list may hold a few lines in another encoding: then every cell is read
    as bytes (pyarrow), so those rows become `invalid_utf8` rejects instead of failing the whole list."""
    try:
        return pl.read_csv(p, separator=sep, quote_char=quote, infer_schema=False)
    except pl.exceptions.ComputeError as e:
        if "utf-8" not in str(e).lower() and "utf8" not in str(e).lower():
            raise
    import pyarrow.csv as pcsv

    names = pl.read_csv(p, separator=sep, quote_char=quote, infer_schema=False, n_rows=0, encoding="utf8-lossy").columns
    table = pcsv.read_csv(
        p,
        parse_options=pcsv.ParseOptions(delimiter=sep, quote_char=quote or False),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.binary() for n in names}),
    )
    return _with_bad_text(table)


def _read_parquet_list(p: str) -> pl.DataFrame:
    """Parquet read with pyarrow; string columns holding bytes that are not UTF-8 (Arrow does not check them
    on read, and polars crashes on them) are flagged per row, as in _read_text_list."""
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    for c in table.columns:
        if pa.types.is_binary(c.type) or pa.types.is_large_binary(c.type):
            return _with_bad_text(table)
        if (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)) and not schema.is_valid_utf8(c):
            return _with_bad_text(table)
    return pl.from_arrow(table)


def group_by_url(df: pl.DataFrame, policy: egress.EgressPolicy | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(to_download, rejected): unique valid URLs in first-seen order with their distinct captions as JSON;
    rejected: malformed URLs, URLs the egress policy refuses outright, rows that are not UTF-8, and repeats of an
    earlier (url, caption) row."""
    good, bad = split_rows(df, policy)
    grouped = (
        good.with_row_index("_order")
        .group_by("url", maintain_order=True)
        .agg(pl.col("caption"), pl.col("_order").min())
        .sort("_order")
        .select(
            "url",
            pl.col("caption").list.first().alias("caption"),
            pl.struct(pl.col("caption").alias("c")).struct.json_encode().alias(CAPTIONS_COL),
        )
    )
    return grouped, bad


def split_rows(df: pl.DataFrame, policy: egress.EgressPolicy | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(good, rejected): the list's rows with a valid URL and UTF-8 text, one per distinct (url, caption), in
    list order (url stripped, caption null as ""); rejected: the others, with `status` and `error_message`
    (`reason_expr` makes their reason). `policy`: the egress policy (its allow_private_hosts), default none."""
    if BAD_TEXT_COL not in df.columns:
        df = df.with_columns(pl.lit(False).alias(BAD_TEXT_COL))
    df = df.with_columns(pl.col("caption").fill_null(""), pl.col("url").str.strip_chars())
    blocked, why = egress_refusals(df["url"], policy or egress.DEFAULT_POLICY)
    df = df.with_columns(blocked.alias(_BLOCKED), why.alias(_WHY))
    url_ok = pl.col("url").is_not_null() & pl.col("url").str.contains(VALID_URL) & pl.col(_BLOCKED).is_null()
    is_bad = pl.col(BAD_TEXT_COL) | ~url_ok
    bad = df.filter(is_bad.fill_null(True)).with_columns(
        status=pl.when(pl.col(BAD_TEXT_COL)).then(pl.lit("invalid_utf8"))
        .when(pl.col(_BLOCKED).is_not_null()).then(pl.col(_BLOCKED)).otherwise(pl.lit("invalid_url")),
        error_message=pl.when(pl.col(BAD_TEXT_COL)).then(pl.lit("url or caption is not valid UTF-8"))
        .when(pl.col(_BLOCKED).is_not_null()).then(pl.col(_WHY)).otherwise(pl.lit("not an http(s) URL")),
    ).drop(BAD_TEXT_COL, _BLOCKED, _WHY)
    good = df.filter(~is_bad.fill_null(True)).drop(BAD_TEXT_COL, _BLOCKED, _WHY)
    # one row per distinct (url, caption): a repeated pair would be the same uid twice; later copies are
    # rejected rows (`duplicate`), so that rows in = kept + rejected still holds
    first = pl.struct("url", "caption").is_first_distinct()
    dups = good.filter(~first).with_columns(
        status=pl.lit(DUPLICATE), error_message=pl.lit(DUPLICATE_MESSAGE))
    bad = pl.concat([bad, dups.select(bad.columns)]) if dups.height else bad
    return good.filter(first), bad



# ---- the egress policy before any request ------------------------------------------------------------------
_BLOCKED, _WHY = "_blocked", "_blocked_why"
_SCHEME = r"^([A-Za-z][A-Za-z0-9+.\-]+):"  # two letters at least: `c:\x` is a malformed URL, not a scheme
# an http(s) URL worth a closer look: userinfo, an IPv6 literal, a host of digits/hex/dots (2130706433, 0x7f.1,
# 10.0.0.1), a localhost name. Every other URL is the web's ordinary kind and is checked when it is resolved.
_SUSPECT = (r"(?i)^https?://(?:[^/?#]*@|\[|[0-9a-fx.]+(?::\d*)?(?:[/?#]|$)"
            r"|(?:[^/?#@]*\.)?localhost\.?(?::\d*)?(?:[/?#]|$))")


def egress_refusals(urls: pl.Series, policy: egress.EgressPolicy) -> tuple[pl.Series, pl.Series]:
    """(reason, message) per URL that the egress policy refuses without any request (another scheme, user@host,
    a literal internal address: `egress.check_url`), null elsewhere. The regexes pick the few URLs that need a
    look; only their distinct values go through Python."""
    scheme = urls.str.extract(_SCHEME, 1).str.to_lowercase()
    look = ((scheme.is_not_null() & ~scheme.is_in(egress.SCHEMES)) | urls.str.contains(_SUSPECT)).fill_null(False)
    reasons, messages = {}, {}
    for url in urls.filter(look).unique().to_list():
        try:
            egress.check_url(url, policy)
        except egress.Blocked as e:
            reasons[url], messages[url] = e.reason, e.msg
        except URLError:
            pass  # malformed: VALID_URL's call (invalid_url)
    if not reasons:
        none = pl.Series([None] * urls.len(), dtype=pl.String)
        return none, none
    return (urls.replace_strict(reasons, default=None, return_dtype=pl.String),
            urls.replace_strict(messages, default=None, return_dtype=pl.String))


def reason_expr() -> pl.Expr:
    """A set-aside row's `reason`: "status: error_message", or the bare status for the egress policy's refusals
    (`blocked_address`, `blocked_scheme`, ...: one reason each, whatever the address)."""
    return (pl.when(pl.col("status").is_in(egress.REASONS)).then(pl.col("status"))
            .when(pl.col("status") == DUPLICATE).then(pl.lit(DUPLICATE_REASON))  # whatever an older list wrote
            .otherwise(pl.col("status") + ": " + pl.col("error_message")))


def spread_hosts(grouped: pl.DataFrame) -> pl.DataFrame:
    """The URL list in round-robin order over hosts (each host's URLs keep their order; hosts come in the order
    of their first URL), so that img2dataset's shards and threads, which take the list in order, meet one host's
    URLs spread out rather than one after another: a list sorted by site would otherwise send a thread pool's
    worth of requests to one host at once. A list of one host keeps its order (the demo world's)."""
    if grouped.height == 0:
        return grouped
    host = pl.col("url").str.extract(r"(?i)^[a-z][a-z0-9+.-]*://([^/?#]*)", 1).str.to_lowercase()
    return (grouped.with_row_index("_i").with_columns(_h=host)
            .with_columns(_round=pl.int_range(pl.len()).over("_h"), _first=pl.col("_i").min().over("_h"))
            .sort(["_round", "_first"], maintain_order=True).drop("_i", "_h", "_round", "_first"))
