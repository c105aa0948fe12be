"""Tiny models and tokenizers built from configs: the demo's base model and the tests' fixtures.

Nothing here downloads weights: models come from `AutoModelForCausalLM.from_config` with a
fixed seed, tokenizers are byte-level BPE trained on the given text.
"""

from __future__ import annotations

from typing import Iterable

import torch
import transformers

# A chat template that needs no special tokens beyond EOS, so that tiny tokenizers can use it.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = 256,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool | None = None,
    **extra,
) -> transformers.PretrainedConfig:
    """A small config of a supported architecture (`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        **extra,
    )
    if tie_word_embeddings is not None:
        kwargs["tie_word_embeddings"] = tie_word_embeddings
    return transformers.AutoConfig.for_model(arch, **kwargs)


def tiny_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM for `config`, the same for the same seed."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, eos_token: str = "<|endoftext|>"
) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with EOS, PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pad_token = "<|pad|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token, pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
