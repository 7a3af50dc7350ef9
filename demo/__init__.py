"""The demo world: a seeded, synthetic, labelled web crawl to run the pipeline on (demo/world.py says what it
writes). Outside the spine: it uses pipeline and stages (the loopback server's host, stages/ingest/serve.py), and
nothing of ours imports it but its command, which pipeline/cli.py finds through the `clipcurate.commands` entry
point, the tests and the benches."""
