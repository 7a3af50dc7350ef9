"""The built-in stages, each a module or package exposing `STAGE`. The spine finds them through the
`clipcurate.stages` entry point (pyproject.toml) and the default recipe through `clipcurate.recipes`."""

# The default recipe: download, ALIGN's cleaning, MetaCLIP's balancing, K-LITE's glosses, the DFN cut, emit.
DEFAULT_RECIPE = ["ingest", "align", "metaclip", "klite", "dfn", "emit"]
