"""Held-out perplexity per language: the user's evidence that the target language improved
and English held.

Each held-out document (token ids, EOS-terminated) is scored in windows of the model's
context; perplexity is exp(total NLL / predicted tokens) over all documents of a language.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, heldout: dict[str, list[list[int]]], max_len: int, device: str = "cpu") -> dict[str, float]:
    """Perplexity per language of `model` (a causal LM) on `heldout` token documents."""
    model.eval().to(device)
    out = {}
    for lang, docs in sorted(heldout.items()):
        nll, count = 0.0, 0
        for doc in docs:
            for start in range(0, max(len(doc) - 1, 1), max_len):
                window = doc[start : start + max_len + 1]
                if len(window) < 2:
                    continue
                ids = torch.tensor([window[:-1]], device=device)
                labels = torch.tensor([window[1:]], device=device)
                logits = model(input_ids=ids).logits.float()
                nll += torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item()
                count += labels.numel()
        if count == 0:
            raise ValueError(f"held-out set for {lang!r} has no tokens to score")
        out[lang] = math.exp(nll / count)
    return out


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per model, one perplexity column per language."""
    langs = sorted({lang for r in rows.values() for lang in r})
    lines = ["| model | " + " | ".join(f"ppl {lang}" for lang in langs) + " |",
             "|---|" + "---:|" * len(langs)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[lang]:.2f}" if lang in r else "-" for lang in langs) + " |")
    return "\n".join(lines)
