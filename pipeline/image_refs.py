"""References into the image store ("<file>#<locator>", pipeline/images.py): made a column at a time and
parsed a column at a time, so that neither ingest nor a reader handles a reference per row in Python. Its error,
ImageStoreError, lives here, beneath both the store's reader and the tar scanner that raise it."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from pipeline.errors import ShardError

REF_COL = "image_ref"


class ImageStoreError(ShardError):
    """The image store cannot be found or read. str() is one line naming the file."""


def parquet_refs(file: str, n: int) -> pa.Array:
    """References to rows 0..n-1 of a Parquet file of the store."""
    return pl.select((pl.lit(f"{file}#") + pl.int_range(0, n, dtype=pl.Int64).cast(pl.String)).alias(REF_COL)) \
        .to_series().to_arrow().cast(pa.string()) if n else pa.array([], pa.string())


def tar_refs(file: str, offsets, sizes, headers=None) -> pa.Array:
    """References to tar members of a store file, from their data offsets and sizes, and (optional) the CRC-32
    of each member's header block: "FILE#OFFSET:SIZE:CRC". The reader then checks that the header before those
    bytes is still that member's (a tar rewritten since it was indexed gives no bytes, never another member's)."""
    df = pl.DataFrame({"o": offsets, "s": sizes, "h": headers if headers is not None else [None] * len(offsets)},
                      schema={"o": pl.Int64, "s": pl.Int64, "h": pl.Int64})
    crc = pl.when(pl.col("h").is_not_null()).then(pl.lit(":") + pl.col("h").cast(pl.String)).otherwise(pl.lit(""))
    return df.select((pl.lit(f"{file}#") + pl.col("o").cast(pl.String) + ":" + pl.col("s").cast(pl.String) + crc)
                     .alias(REF_COL)).to_series().to_arrow().cast(pa.string())


def parse_refs(refs) -> pl.DataFrame:
    """(i, file, loc) for every non-null reference; i is its position in `refs`. Vectorised; the locator is
    what follows the last '#' (digits and ':'), so a file name may hold a '#' of its own."""
    s = pl.Series(REF_COL, refs, dtype=pl.String)
    parts = s.str.extract_groups(r"^(.*)#([0-9:]+)$")
    df = pl.DataFrame({"i": pl.int_range(0, len(s), eager=True), "ref": s,
                       "file": parts.struct.field("1"), "loc": parts.struct.field("2")})
    bad = df.filter(pl.col("ref").is_not_null() & pl.col("loc").is_null())
    if bad.height:
        raise ImageStoreError(f"image store: malformed image reference {bad['ref'][0]!r} (expected FILE#ROW or "
                              "FILE#OFFSET:SIZE[:CRC])")
    return df.filter(pl.col("loc").is_not_null()).drop("ref")
