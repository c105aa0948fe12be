"""The paper's claims in miniature (issues #7, #16): `benchmarks/replicate.py` and its parts.

- `languages`   the target languages: Debian package, pages, how a document is told to be translated
- `corpus`      Debian's English and target-language manual pages -> deduplicated JSONL, held-out pages
- `experiment`  size presets, corpus/tokenizer/base model built once per settings, training stages, perplexity
- `methods`     the compared methods (full, lora, elo, elo-middle): add one here to get its rows
- `rows`        a method under one setting; the published row lists; results.json, resumable
- `report`      the markdown tables and the PNG plots
"""
