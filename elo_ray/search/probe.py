"""A probe that trains nothing: how hard each language pulls on each decoder layer of the base.

On a sample of each language's text, the squared norm of the causal-LM loss gradient with respect
to each decoder layer's parameters, G_l = ||dL/dθ_l||². To first order, a small step of size η
along the gradient of the layers S lowers the loss by η Σ_{l in S} G_l, so the probe scores a
candidate layer set by Σ_{l in S} G_l on the target languages and ranks the candidates by it
(highest first). English's scores say what the same step would do to English.

It costs one forward and backward of the base model over `search.probe_docs` documents per
language (in windows of the data's seq_len): no optimizer, no Ray Train. The sample is the
documents right after the held-out ones, in source order (text the pretraining may see, never the
text the ranking is scored on). Whether its ranking agrees with the trained one is measured,
not assumed: `elo-ray search` writes both with their rank correlation, and benchmarks/README.md
reports it on the manual-page corpus.
"""

from __future__ import annotations

import logging
import tempfile

from elo_ray import storage

log = logging.getLogger(__name__)


def sample(cfg, tokenizer: str, docs: int) -> dict[str, list[list[int]]]:
    """`docs` token documents per language of a pretrain data config, after its held-out ones."""
    from elo_ray import data

    wider = cfg.model_copy(update={"heldout_docs": cfg.heldout_docs + docs})
    return {lang: found[cfg.heldout_docs:] for lang, found in data.heldout(wider, tokenizer).items()}


def layer_gradient_norms(model_uri: str, docs: dict[str, list[list[int]]], seq_len: int,
                         use_gpu: bool = False) -> dict[str, list[float]]:
    """G_l per language: the squared gradient norm of each decoder layer's parameters for the mean
    causal-LM loss over `docs` (module docstring)."""
    import torch
    import transformers

    from elo_ray.train.model import decoder_layers

    device = "cuda" if use_gpu else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download(model_uri, tmp) if storage.has_scheme(model_uri) else model_uri
        model = transformers.AutoModelForCausalLM.from_pretrained(
            local, dtype=torch.bfloat16 if use_gpu else torch.float32)
    model.to(device).eval()  # no dropout; gradients still flow
    if use_gpu:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in in_layers)  # no gradients of embedding and head: not candidates
    out = {}
    for lang, lang_docs in sorted(docs.items()):
        windows = [d[i:i + seq_len + 1] for d in lang_docs for i in range(0, max(len(d) - 1, 1), seq_len)]
        windows = [w for w in windows if len(w) >= 2]
        total = sum(len(w) - 1 for w in windows)
        if not total:
            raise ValueError(f"probe: no {lang} text to score; raise search.probe_docs or add {lang} documents")
        model.zero_grad(set_to_none=True)
        for w in windows:
            ids = torch.tensor([w[:-1]], device=device)
            labels = torch.tensor([w[1:]], device=device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            (torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum") / total).backward()
        out[lang] = [float(sum(p.grad.float().pow(2).sum() for p in layer.parameters() if p.grad is not None))
                     for layer in layers]
        log.info(f"probe: {lang}: {total:,} tokens; gradient norm² per layer "
                 + " ".join(f"{g:.3g}" for g in out[lang]))
    return out


def score(norms: dict[str, list[float]], layers: tuple[int, ...], languages: list[str]) -> float:
    """A layer set's probe score: Σ_{l in layers} G_l, averaged over `languages`."""
    return sum(sum(norms[lang][i] for i in layers) for lang in languages) / len(languages)
