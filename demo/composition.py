"""The demo world's composition: which noise kinds it draws, and how many rows of each (`kind_counts`).

The default world (SHARES) is mostly clean, with a few percent of each kind so that every rule of every stage
has something to find. The web world (WEB_SHARES) is as noisy as a raw web crawl.

The web composition (share of the n URL rows; set from the published figures below before any ablation was run).
"Our choice" marks a value no source we found gives; the rest cite what they rest on.

  kind             share   where it comes from
  clean            ~0.11   the rest (0.112 at n=3000; many_texts takes max(25, min(60, n/50)) rows first; 0.127
                           before semantic_duplicate took its 0.015 from it). What a good curation should keep:
                           DataComp-1B is 1.4B of CommonPool's 12.8B pairs (11%) [1], DFN-2B 2B of 12.8B (15.6%) [2].
  weak             0.30    weak + mismatched = 0.52, a majority: LAION's CLIP-similarity thresholds (ViT-B/32:
  mismatched       0.22    0.30 for LAION-400M [3], 0.28 for LAION-5B [4]) keep only 20% (>= 0.300) and 30%
                           (>= 0.281) of CommonPool [1, Table 16], and DataComp's CLIP-score baseline keeps the top
                           30% [1, Table 3]: 70-80% of a raw crawl scores below what LAION kept. Here the rows a CLIP
                           filter would pass (clean, duplicates, and the rule-caught kinds whose caption is right:
                           sizes, too_long, rare_token, many_texts, eval_copy) are ~0.31; of the rest, 0.52 are
                           only a CLIP score's to catch. The 0.30 / 0.22 split is our choice (alt-text that says
                           little is commoner than alt-text written for another picture; no source splits them).
  boilerplate      0.04    our choice (ALIGN drops alt-text shared by more than 10 images [5]; we found no share).
  exact_duplicate  0.03    duplicates are 0.06 = ~32% of the clean rows plus their copies (0.06 / 0.187): Webster
  near_duplicate   0.03    et al. find roughly 700M, about 30%, of LAION-2B's images likely duplicated [6]. The
                           exact / near split is our choice.
  semantic_duplicate 0.015 our choice, taken from the clean rest (the other kinds' shares are as they were). A clean
                           image re-framed (a crop: a shift and a zoom), re-sized, sometimes re-coloured (saturation,
                           contrast) and re-encoded, with its caption paraphrased: the same scene, which neither
                           align's content hash nor MinHash at 0.8 catches, and a dHash within 6 bits rarely (4-7%)
                           (SemDeDup's "semantic duplicates" [9]; tests/test_world_semantic.py). With it the duplicates
                           are 0.075 = 40% of the clean rows plus their copies (0.075 / 0.187), between Webster et al.'s
                           ~30% of LAION-2B [6] (near-identical images only) and the 50% of LAION-440M SemDeDup removes
                           at its thresholds with minimal loss [9]; SNIP puts LAION-2B's duplicates at about a third
                           (issue 31). The value is bounded by the clean rest: each copy needs a clean original of its
                           own, and 0.015 is the largest (in steps of 0.005) whose copies find one at n = 600 (the
                           tests' web world); below n ~ 650 `demo.world._final_counts` caps it at the originals left.
  too_short        0.02    our choice (DataComp's basic filter drops captions of <= 2 words or < 6 characters [1];
  too_long         0.015   no share given for them alone).
  rare_token       0.01    our choice.
  small_image      0.04    our choice; LAION-400M, already filtered, has 211M of 413M images with both sides
  odd_aspect       0.01    >= 256 px [3], i.e. half with a side under 256 px, but no source gives the share under
                           ALIGN's / DataComp's 200 px (or over aspect 3) [1, 5].
  non_english      0.03    our choice, for an English-targeted crawl after language ID. Without language ID a crawl
                           is mostly not English: LAION-5B is 2.3B English, 2.2B other languages and 1B undetermined
                           of 5.85B [4], and in CommonPool English filtering halves what a CLIP threshold of 0.30
                           keeps (10.2% vs 20% of the pool) [1, Table 16]. The demo's stages and evaluation are
                           English, its non-English captions come from a small glossary (more rows would make them
                           repeated alt-text), and align's language rule is off by default, so we keep the residue
                           small.
  eval_copy        0.028   DataComp flags ~2.8% of CommonPool's downloaded samples as near-duplicates of its
                           evaluation images [1, App. F] (capped at the eval set's size: 240 images).
  http_404         0.06    failed downloads are 0.08: img2dataset's author reports LAION-400M at ~95% download
  not_image        0.02    success at release and ~87% eight months later (~1% link rot a month), and a user's
                           stats file of 8,542 successes, 594 HTTP 404s and over 200 other failures (403, 503,
                           DNS, robots) [7]: 404s 0.06, other failures (stood in for by a page that is not an
                           image) 0.02.
                           A URL list drawn from old snapshots rots far more (DataComp downloaded ~16.8B of ~40B
                           attempted [1]); ours is a fresh list.
  many_texts       fixed   as in the default world (one image, max(25, min(60, n/50)) alt-texts).

Concept frequencies (web): Zipf exponents 1.5 over shapes and 1.2 over colours instead of 1.1 and 0.9 (our choice).
On the web a few concepts match millions of pairs and most match few (MetaCLIP's entry counts, which is why it caps
each entry at t = 20,000 at 400M pairs [8]); with only 12 shapes the default exponent leaves a mild head (the top
shape 36% of images, the last 2.3%), the steeper one a real head and a thin tail (49% and 1.2%), so metaclip's
balancing has something to cap and the tail shapes are as data-poor as the web's.

Sources:
  [1] Gadre et al. 2023, "DataComp: In search of the next generation of multimodal datasets", arXiv 2304.14108,
      https://arxiv.org/abs/2304.14108 (Table 3, Table 16, section 3.2, Appendix F).
  [2] Fang et al. 2023, "Data Filtering Networks", arXiv 2309.17425, https://arxiv.org/abs/2309.17425; the DFN-2B
      models' card: "2B images that were filtered from a pool of 12.8B",
      https://huggingface.co/apple/DFN2B-CLIP-ViT-L-14
  [3] LAION-400M, https://laion.ai/blog/laion-400-open-dataset/ (CLIP ViT-B/32 similarity >= 0.3; size statistics).
  [4] LAION-5B, https://laion.ai/blog/laion-5b/ and Schuhmann et al. 2022, arXiv 2210.08402 (threshold 0.28;
      2.3B English, 2.2B other languages, 1B undetermined of 5.85B).
  [5] Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation Learning With Noisy Text
      Supervision" (ALIGN), arXiv 2102.05918, https://arxiv.org/abs/2102.05918, section 3.
  [6] Webster et al. 2023, "On the De-duplication of LAION-2B", arXiv 2303.12733, https://arxiv.org/abs/2303.12733.
  [7] rom1504/img2dataset issue #277, "Failed to download all of LAION-400M",
      https://github.com/rom1504/img2dataset/issues/277
  [8] Xu et al. 2023, "Demystifying CLIP Data" (MetaCLIP), arXiv 2309.16671, https://arxiv.org/abs/2309.16671.
  [9] Abbas et al. 2023, "SemDeDup: Data-efficient learning at web-scale through semantic deduplication",
      arXiv 2303.09540, https://arxiv.org/abs/2303.09540.
"""

from __future__ import annotations

KINDS = ["clean", "boilerplate", "many_texts", "mismatched", "weak", "exact_duplicate", "near_duplicate",
         "semantic_duplicate", "too_short", "too_long", "rare_token", "small_image", "odd_aspect", "non_english",
         "eval_copy", "http_404", "not_image"]
# share of the n URL rows per kind (clean is the rest); many_texts is a fixed block
SHARES = {"boilerplate": 0.05, "mismatched": 0.08, "exact_duplicate": 0.03, "near_duplicate": 0.03,
          "too_short": 0.03, "too_long": 0.025, "rare_token": 0.01, "small_image": 0.03, "odd_aspect": 0.02,
          "non_english": 0.01, "eval_copy": 0.02, "http_404": 0.02, "not_image": 0.01}
# the web world's composition: the table and its sources are in this module's docstring
WEB_SHARES = {"weak": 0.30, "mismatched": 0.22, "boilerplate": 0.04, "exact_duplicate": 0.03, "near_duplicate": 0.03,
              "too_short": 0.02, "too_long": 0.015, "rare_token": 0.01, "small_image": 0.04, "odd_aspect": 0.01,
              "non_english": 0.03, "eval_copy": 0.028, "http_404": 0.06, "not_image": 0.02,
              "semantic_duplicate": 0.015}
NOISE_SHARES = {"default": SHARES, "web": WEB_SHARES}
NOISE_MODES = tuple(NOISE_SHARES)
WEB_ONLY_KINDS = [k for k in KINDS if k != "clean" and k != "many_texts" and k not in SHARES]  # weak, semantic_duplicate
MIN_N = 200  # every noise kind needs a few rows
WEB_MIN_N = 500  # below it the web world's duplicates outnumber the clean originals they copy
WEB_ZIPF = (1.5, 1.2)  # shape and colour exponents of the web world (default: 1.1 and 0.9); see the docstring
DUP_URL_SHARE = 0.05  # clean images that come with a second (or third) alt-text


def clean_images(n_clean: int) -> int:
    """Distinct images among n_clean clean rows (the rest are second or third alt-texts of some of them)."""
    return int(n_clean / (1 + DUP_URL_SHARE * 1.5))


def clean_originals(n_clean: int) -> int:
    """Clean images with one alt-text among n_clean clean rows: the originals the duplicate kinds copy, one each
    (`demo.kinds.clean` gives each of the n_clean - images extra rows to a different image)."""
    images = clean_images(n_clean)
    return images - min(n_clean - images, images)


def kind_counts(n: int, noise: str = "default") -> dict[str, int]:
    """Rows per kind for a world of n rows, before the eval-copy cap: round(n * share) per kind of the mode's
    table, many_texts a fixed block, clean the rest."""
    counts = {k: int(round(n * s)) for k, s in NOISE_SHARES[noise].items()}
    counts["many_texts"] = max(25, min(60, n // 50))
    counts["clean"] = n - sum(counts.values())
    return counts

