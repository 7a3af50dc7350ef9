"""ingest: a response that is no image (an HTML page under a .jpg name) is `not_an_image`, not a resize failure.
The download through img2dataset is tested in test_ingest.py (its loopback site serves HTML and text as .jpg)."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.images import parquet_refs
from stages.ingest import IngestStage
from stages.ingest.guard import SniffingResizer, sniff_not_an_image


def _jpeg() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(b, "JPEG")
    return b.getvalue()


@pytest.mark.parametrize("head, why", [
    (b"<!DOCTYPE html><html><head><title>Moved</title>", "not_an_image: an HTML page"),
    (b"\xef\xbb\xbf\n  <html lang=en><body>Not found</body></html>", "not_an_image: an HTML page"),
    (b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>', "not_an_image: an XML or HTML document"),
    (b'{"error": "forbidden"}', "not_an_image: text"),
    (b"", "not_an_image: an empty response"),
    (b" \r\n", "not_an_image: an empty response"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', None),  # an image img2dataset can't decode
    (_jpeg()[:40], None),  # an image cut short: img2dataset's own error stays
    (b"\x89PNG\r\n\x1a\n" + b"\x07" * 30, None),
    (bytes(range(128, 256)) * 4, None),  # binary, not UTF-8
])
def test_sniff_tells_a_page_from_a_broken_image(head, why):
    assert sniff_not_an_image(head) == why


def test_sniffing_resizer_replaces_only_the_error_of_a_non_image():
    calls = []

    def resizer(stream, bbox):  # img2dataset's resizer: (img, w, h, ow, oh, err), reading the stream to its end
        calls.append(stream.read())
        return (None,) * 5 + ("Image decoding error",) if calls[-1].startswith(b"<") else (b"img", 1, 1, 1, 1, None)

    r = SniffingResizer(resizer)
    assert r(io.BytesIO(b"<html><body>x</body></html>"), None)[-1] == "not_an_image: an HTML page"
    assert r(io.BytesIO(_jpeg()), None) == (b"img", 1, 1, 1, 1, None)
    assert SniffingResizer(lambda s, b: (None,) * 5 + ("image too small",))(io.BytesIO(_jpeg()), None)[-1] == \
        "image too small"


def test_conversion_gives_the_not_an_image_reason():
    urls = ["http://h.invalid/a.jpg", "http://h.invalid/b.jpg"]
    t = pa.table({
        "caption": ["a page", "a broken picture"], "url": urls, "key": ["000000000", "000000001"],
        "status": ["failed_to_resize"] * 2, "error_message": ["not_an_image: an HTML page", "Image decoding error"],
        "width": pa.nulls(2, pa.int64()), "height": pa.nulls(2, pa.int64()),
        "original_width": pa.nulls(2, pa.int64()), "original_height": pa.nulls(2, pa.int64()),
    })
    t = t.append_column("image_ref", parquet_refs("00000.parquet", 2))
    kept, rejected = IngestStage().apply(t, None)
    assert kept.num_rows == 0
    assert rejected.column("reason").to_pylist() == ["not_an_image: an HTML page", "failed_to_resize: Image decoding error"]
