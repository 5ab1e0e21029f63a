"""Domain packs: one folder per domain (its sources in their released layouts, answer format and parser, metrics,
baselines, synthetic generator), each a row of the table in `nvila_ft.domains.registry`, plus the machinery they
share (tasks, built-in data, baselines, scoring)."""
