"""ingest's opt-outs as rules (stages/ingest/optout_rules.py): each rule's mask, their order, and a fact missing."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.rules import judge, reasons
from stages.ingest import X_ROBOTS_ERROR, X_ROBOTS_TAG, IngestStage
from stages.ingest.optout_rules import (AFTER_DOWNLOAD, BEFORE_DOWNLOAD, OptoutFacts, RobotsDisallowed, TdmHeader,
                                        TdmReserved, XRobotsTag)
from stages.ingest.policies import ROBOTS_DISALLOWED, TDM_RESERVED
from stages.ingest.urls import TDM_HEADER_ERROR

T, F = True, False


def test_the_rules_are_named_by_the_reasons_callers_import():
    assert reasons(BEFORE_DOWNLOAD) == [ROBOTS_DISALLOWED, TDM_RESERVED] == ["robots_disallowed", "tdm_reserved"]
    assert reasons(AFTER_DOWNLOAD) == [X_ROBOTS_TAG, TDM_RESERVED] == ["x_robots_tag", "tdm_reserved"]


def test_each_rules_mask():
    f = OptoutFacts(robots_allowed=np.array([T, F, T]), tdm_reservation=np.array([1.0, 0.0, np.nan]),
                    x_robots_tag=np.array([F, T, F]), tdm_header=np.array([T, F, F]))
    assert RobotsDisallowed().mask(f).tolist() == [F, T, F]
    assert TdmReserved().mask(f).tolist() == [T, F, F]  # 0 and no rule (NaN) reserve nothing
    assert XRobotsTag().mask(f).tolist() == [F, T, F]
    assert TdmHeader().mask(f).tolist() == [T, F, F]
    # TDMRep's value as polars gives it for a host with no matching rule: an Int8 column of nulls
    none = OptoutFacts(tdm_reservation=pl.Series([None, 1], dtype=pl.Int8).to_numpy())
    assert TdmReserved().mask(none).tolist() == [F, T]


def test_robots_comes_before_tdmrep():
    f = OptoutFacts(robots_allowed=np.array([F, F, T, T]), tdm_reservation=np.array([1, 0, 1, 0]))
    got, skipped = judge(BEFORE_DOWNLOAD, f, 4)
    assert got.to_pylist() == [ROBOTS_DISALLOWED, ROBOTS_DISALLOWED, TDM_RESERVED, None] and skipped == []


def test_x_robots_tag_comes_before_the_tdm_header():
    f = OptoutFacts(x_robots_tag=np.array([T, T, F, F]), tdm_header=np.array([T, F, T, F]))
    assert judge(AFTER_DOWNLOAD, f, 4)[0].to_pylist() == [X_ROBOTS_TAG, X_ROBOTS_TAG, TDM_RESERVED, None]


def test_a_missing_fact_skips_its_rule_and_says_so():
    f = OptoutFacts(robots_allowed=None, tdm_reservation=np.array([1, 0]))
    got, skipped = judge(BEFORE_DOWNLOAD, f, 2)
    assert got.to_pylist() == [TDM_RESERVED, None] and skipped == [ROBOTS_DISALLOWED]
    got, skipped = judge(AFTER_DOWNLOAD, OptoutFacts(), 3)
    assert got.to_pylist() == [None] * 3 and skipped == [X_ROBOTS_TAG, TDM_RESERVED]


def test_conversion_keeps_the_header_opt_outs_between_not_an_image_and_duplicate():
    """The stage's chain: an egress refusal, then not_an_image, then the header opt-outs, then duplicate, then
    img2dataset's status and error."""
    rows = [("success", X_ROBOTS_ERROR, None),  # a success is kept whatever its error text
            ("failed_to_download", "blocked_address: 10.0.0.1", "blocked_address"),
            ("failed_to_download", "not_an_image: an HTML page", "not_an_image: an HTML page"),
            ("failed_to_download", X_ROBOTS_ERROR, X_ROBOTS_TAG),
            ("failed_to_download", TDM_HEADER_ERROR, TDM_RESERVED),
            ("duplicate", X_ROBOTS_ERROR, X_ROBOTS_TAG),  # the header's opt-out outranks duplicate
            ("duplicate", None, "duplicate: same url and caption as another row"),
            ("failed_to_download", "HTTP Error 404: gone", "failed_to_download: HTTP Error 404: gone")]
    t = pa.table({"url": [f"http://a.example/{i}.jpg" for i in range(len(rows))],
                  "caption": [f"c{i}" for i in range(len(rows))],
                  "status": [s for s, _, _ in rows], "error_message": [e for _, e, _ in rows]})
    kept, rejected = IngestStage._convert(None, t)
    assert kept.column("url").to_pylist() == ["http://a.example/0.jpg"]
    assert rejected.column("reason").to_pylist() == [r for _, _, r in rows[1:]]
