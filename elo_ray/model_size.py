"""The sizes of a decoder LM, from its Hugging Face config alone: dimensions, parameters by part,
the weight-matrix parameters that training FLOPs count, LoRA adapter parameters.

No torch, Ray or pydantic here: the memory estimate (memory.py), the training metrics
(train/metrics.py) and the bare-PyTorch benchmarks all count from this one place.

Parameters, from the config alone (h hidden, i intermediate, V vocab, nh/nkv attention and
key-value heads, d head_dim, q = nh*d, kv = nkv*d):
    embedding   V*h
    layer       attention h*q + 2*h*kv + q*h  (+ q + 2*kv biases in Qwen2, + q + 2*kv + h with
                `attention_bias`), q/k norms 2*d (Qwen3, Gemma3), MLP 3*h*i (+ 2*i + h with
                `mlp_bias`), norms 2*h (Gemma2/3: 4*h)
    final norm  h
    head        V*h, or 0 when `tie_word_embeddings`
Llama-3.1-8B: 525.3M + 32 * 218.1M + 4096 + 525.3M = 8.03B.
Weight-matrix parameters of a layer (what a forward multiplies, 2 FLOPs each per token):
    2*h*q + 2*h*kv + 3*h*i
LoRA on every projection: rank * (in + out) per projection, 2*(h + q) + 2*(h + kv) + 3*(h + i)
per layer times the rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """What a decoder layer holds beyond the Llama layout, by `model_type`."""

    qkv_bias: bool = False  # Qwen2: biases on q/k/v whatever `attention_bias` says
    qk_norm: bool = False  # Qwen3, Gemma3: RMSNorm over head_dim on q and k
    norms_per_layer: int = 2  # Gemma2/3 add pre/post feed-forward norms
    fp32_norm_output: bool = False  # Gemma's RMSNorm keeps its normalised x in fp32
    eager_attention: bool = False  # Gemma2: no SDPA in transformers, so s*s scores are kept


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(),
    "mistral": Architecture(),
    "qwen2": Architecture(qkv_bias=True),
    "qwen3": Architecture(qk_norm=True),
    "gemma": Architecture(fp32_norm_output=True),
    "gemma2": Architecture(norms_per_layer=4, fp32_norm_output=True, eager_attention=True),
    "gemma3_text": Architecture(qk_norm=True, norms_per_layer=4, fp32_norm_output=True),
}
"""Unknown model types are counted as the Llama layout, the common decoder of this family."""


@dataclass(frozen=True)
class Dims:
    """The sizes of a decoder LM that parameters, FLOPs and memory depend on."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    logit_softcap: bool

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES.get(self.model_type, Architecture())


def dims(model_config: Any) -> Dims:
    """Sizes from a `transformers.PretrainedConfig` (the text part of a multimodal one)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    return Dims(
        model_type=cfg.model_type,
        vocab=cfg.vocab_size,
        hidden=hidden,
        intermediate=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        logit_softcap=bool(getattr(cfg, "final_logit_softcapping", None)),
    )


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a decoder LM by part; `total` is what `sum(p.numel())` gives."""

    embedding: int
    layer: int
    norm: int
    head: int
    num_layers: int

    def with_layers(self, n: int) -> int:
        """Parameters of the same model with `n` decoder layers (the ELO model)."""
        return self.embedding + n * self.layer + self.norm + self.head

    @property
    def root(self) -> int:
        """What FSDP's root group holds: everything outside the decoder layers."""
        return self.embedding + self.norm + self.head

    @property
    def total(self) -> int:
        return self.with_layers(self.num_layers)


def param_counts(model_config: Any) -> ParamCounts:
    """Parameter counts computed from the config (formulas in the module docstring)."""
    d = dims(model_config)
    h, i = d.hidden, d.intermediate
    attention = h * d.q + 2 * h * d.kv + d.q * h
    if d.arch.qkv_bias:
        attention += d.q + 2 * d.kv
    elif d.attention_bias:
        attention += d.q + 2 * d.kv + h
    if d.arch.qk_norm:
        attention += 2 * d.head_dim
    mlp = 3 * h * i + ((2 * i + h) if d.mlp_bias else 0)
    layer = attention + mlp + d.arch.norms_per_layer * h
    return ParamCounts(
        embedding=d.vocab * h,
        layer=layer,
        norm=h,
        head=0 if d.tied else d.vocab * h,
        num_layers=d.num_layers,
    )



def layer_matmul_params(model_config: Any) -> int:
    """Weight-matrix parameters of one decoder layer (attention + gated MLP), without biases
    and norms: what training FLOPs count."""
    d = dims(model_config)
    return 2 * d.hidden * d.q + 2 * d.hidden * d.kv + 3 * d.hidden * d.intermediate


def lora_params_per_layer(model_config: Any, rank: int) -> int:
    """Adapter parameters of one layer with LoRA on every projection (rank * (in + out) each)."""
    d = dims(model_config)
    return rank * (2 * (d.hidden + d.q) + 2 * (d.hidden + d.kv) + 3 * (d.hidden + d.intermediate))
