"""The paper's claims in miniature (issue #7): `benchmarks/replicate.py` and its parts.

- `corpus`      Debian's English and Japanese manual pages -> deduplicated JSONL, held-out pages
- `experiment`  size presets, the base model's pretraining, the compared methods, perplexity
- `report`      the markdown table and the PNG plots
"""
