"""ingest's opt-outs as rules (pipeline/rules.py's idiom), so that a site owner's refusal is decided the way every
other rejection is: each rule's `name` is the reason, `needs` the `OptoutFacts` it reads, and `mask` is True where
the URL or response is opted out. Two ordered lists: `BEFORE_DOWNLOAD` (robots.txt, then TDMRep: optout.py's
check_urls) and `AFTER_DOWNLOAD` (the image response's X-Robots-Tag, then its tdm-reservation header: the stage's
conversion, which places their reason after the egress refusals and not_an_image, before duplicate). Each list
is run by pipeline.rules' `judge`."""

from __future__ import annotations

import numpy as np

from pipeline.rules import Facts, Rule
from stages.ingest.policies import ROBOTS_DISALLOWED, TDM_RESERVED

X_ROBOTS_TAG = "x_robots_tag"  # the reason: the image response's X-Robots-Tag opts it out


class OptoutFacts(Facts):
    """Per URL (before the download) or per response (after it); None: not known here, its rule is skipped."""

    FIELDS = (
        "robots_allowed",  # bool: robots.txt lets our product token fetch it
        "tdm_reservation",  # TDMRep's tdm-reservation: 1, 0, or NaN/None (no rule)
        "x_robots_tag",  # bool: the response's X-Robots-Tag names a refused directive
        "tdm_header",  # bool: the response's tdm-reservation header is 1
    )


# ---- before the download: the host's robots.txt and /.well-known/tdmrep.json ------------------------------------
class RobotsDisallowed(Rule):
    """robots.txt disallows the URL for our product token (or is unreachable: RFC 9309 disallows all)."""
    name, needs = ROBOTS_DISALLOWED, ("robots_allowed",)

    def mask(self, f: OptoutFacts) -> np.ndarray:
        return ~np.asarray(f.robots_allowed, dtype=bool)


class TdmReserved(Rule):
    """The host's TDMRep file reserves text-and-data-mining rights for the URL's path."""
    name, needs = TDM_RESERVED, ("tdm_reservation",)

    def mask(self, f: OptoutFacts) -> np.ndarray:
        return np.asarray(f.tdm_reservation) == 1


# ---- after it: the image response's headers, read before its body -----------------------------------------------
class XRobotsTag(Rule):
    """The response's X-Robots-Tag opts the image out (img2dataset's check; it read no body)."""
    name, needs = X_ROBOTS_TAG, ("x_robots_tag",)

    def mask(self, f: OptoutFacts) -> np.ndarray:
        return np.asarray(f.x_robots_tag, dtype=bool)


class TdmHeader(Rule):
    """The response's `tdm-reservation: 1` header reserves TDM rights (guard.TdmHeaderProcessor: body unread)."""
    name, needs = TDM_RESERVED, ("tdm_header",)

    def mask(self, f: OptoutFacts) -> np.ndarray:
        return np.asarray(f.tdm_header, dtype=bool)


BEFORE_DOWNLOAD = (RobotsDisallowed(), TdmReserved())
AFTER_DOWNLOAD = (XRobotsTag(), TdmHeader())


__all__ = ["X_ROBOTS_TAG", "OptoutFacts", "RobotsDisallowed", "TdmReserved", "XRobotsTag", "TdmHeader",
           "BEFORE_DOWNLOAD", "AFTER_DOWNLOAD"]
