"""`clipcurate metadata ...`: build concept lists (registered under the `clipcurate.commands` entry point)."""

from __future__ import annotations

from metadata import concepts


def cmd_wordnet(args) -> int:
    entries = concepts.wordnet_entries()
    concepts.save_entries(entries, args.out)
    print(f"{len(entries)} WordNet entries written to {args.out} (cached at {concepts.wordnet_cache_path()})")
    return 0


def cmd_mine(args) -> int:
    texts = concepts.read_corpus(args.corpus, args.column)
    mined = concepts.mine_ngrams(texts, min_count=args.min_count, min_bigram_count=args.min_bigram_count,
                                 min_pmi=args.min_pmi)
    base = concepts.resolve_entries(args.base) if args.base is not None else []
    out = concepts.extend(base, mined["entry"].to_list())
    concepts.save_entries(out, args.out)
    uni = int((mined["kind"] == "unigram").sum())
    print(f"{len(texts)} captions: {uni} unigrams (count >= {args.min_count}), {mined.height - uni} bigrams "
          f"(count >= {args.min_bigram_count}, PMI >= {args.min_pmi}); {len(out) - len(base)} new entries after "
          f"{len(base)} base entries -> {args.out}")
    if args.table:
        mined.write_csv(args.table)
        print(f"mined n-grams with counts and PMI: {args.table}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("metadata", help="concept lists for metaclip: from WordNet, or mined from captions")
    msub = p.add_subparsers(dest="metadata_command", required=True)

    w = msub.add_parser("wordnet", help="every WordNet lemma (+ '0'..'99'), one entry a line (or .json)")
    w.add_argument("out", help="output list (.json = JSON list; else one entry a line)")
    w.set_defaults(fn=cmd_wordnet)

    m = msub.add_parser("mine", help="frequent unigrams and high-PMI bigrams of a caption corpus, appended to a base list")
    m.add_argument("corpus", help="Parquet (file or folder) / CSV / TSV with a text or caption column, or a text file")
    m.add_argument("out", help="output list (.json = JSON list; else one entry a line)")
    m.add_argument("--column", default=None, help="caption column (default: text, then caption)")
    m.add_argument("--base", default=None,
                   help="list to extend ('wordnet' or a file; its ids stay unchanged); default: none")
    m.add_argument("--min-count", type=int, default=100, help="unigram count threshold (MetaCLIP: 100 on Wikipedia)")
    m.add_argument("--min-bigram-count", type=int, default=5, help="bigram count threshold")
    m.add_argument("--min-pmi", type=float, default=30.0,
                   help="bigram PMI threshold, log2 (MetaCLIP: 30 on Wikipedia; at most log2(#tokens): lower it for small corpora)")
    m.add_argument("--table", default=None, help="also write the mined n-grams (entry, kind, count, pmi) as CSV")
    m.set_defaults(fn=cmd_mine)
