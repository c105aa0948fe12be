"""The model's tokenizer in the data plane: documents -> EOS-terminated ids -> packed sequences,
and chat conversations -> (input_ids, labels) with loss on assistant tokens only.

The encoder travels to Ray Data read tasks once, through the object store (`ray.put`), and is
cached per worker process: a 7-8B model's tokenizer is several MB, and a read task per unit
would otherwise carry its own copy. For pretraining it travels as the bare Rust tokenizer, so
that read tasks start without importing transformers (seconds per fresh worker process).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from itertools import chain

import numpy as np

from elo_ray import storage
from elo_ray.data.sources import DataError

IGNORE = -100  # label of positions without loss
_PROBE = "Probe 42: naïve 한국어 テキスト."
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


def load_tokenizer(tokenizer):
    """A fast HF tokenizer with an EOS token, from an object or a location (local dir or URI)."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        where = tokenizer
        try:
            if storage.has_scheme(where):  # a model directory: fetch the small files, never the weights
                names = [n for n in storage.listdir(where) if not n.endswith(_WEIGHTS)]
                local = storage.download(where, tempfile.mkdtemp(prefix="elo-ray-tokenizer-"), names)
                tokenizer = AutoTokenizer.from_pretrained(local)
            else:
                tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError, storage.StorageError) as e:
            raise DataError(f"cannot load a tokenizer from {where}: {e}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; elo-ray tokenizes with the fast (Rust) "
            f"one: save the model's tokenizer.json next to it or load it with use_fast=True"
        )
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token, and every packed document must end with one; set eos_token "
            "in tokenizer_config.json (e.g. the model's end-of-text token)"
        )
    return tokenizer


class DocEncoder:
    """Documents -> token ids, each ending with EOS, batched through the fast tokenizer.

    Special tokens are added as the model's tokenizer adds them (e.g. Llama 3's BOS), because
    that is how the model saw documents in its own pretraining.
    """

    def __init__(self, tokenizer):
        self.eos = tokenizer.eos_token_id
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust call skips Python-side work; use it only where it gives the very same ids.
        same = backend is not None and backend.encode(_PROBE).ids == tokenizer(_PROBE)["input_ids"]
        self.backend = backend if same and hasattr(backend, "encode_batch_fast") else None

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.backend is not None:  # the Rust tokenizer alone: read tasks need not import transformers
            state["tokenizer"] = None
        return state

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            ids = [e.ids for e in self.backend.encode_batch_fast(texts)]
        else:
            ids = self.tokenizer(texts, return_attention_mask=False)["input_ids"]
        eos = self.eos
        return [x if x and x[-1] == eos else x + [eos] for x in ids]


class Packer:
    """Concatenates documents of one language and cuts full `seq_len` sequences; keeps the tail."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.carry = np.empty(0, dtype=np.int32)

    def add(self, docs: list[list[int]]) -> np.ndarray:
        n = sum(len(d) for d in docs)
        flat = np.fromiter(chain.from_iterable(docs), dtype=np.int32, count=n)
        buf = np.concatenate([self.carry, flat]) if len(self.carry) else flat
        k = len(buf) // self.seq_len
        self.carry = buf[k * self.seq_len:].copy()
        return buf[: k * self.seq_len].reshape(k, self.seq_len)

    @property
    def tail(self) -> int:
        return len(self.carry)


class ChatEncoder:
    """Conversations -> fixed-length (input_ids, labels): labels are the ids on assistant tokens
    (from the chat template's {% generation %} marks) and -100 everywhere else, padding included.
    One example per sequence; longer ones are truncated to `seq_len`."""

    def __init__(self, tokenizer, seq_len: int):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; chat data needs one (tokenizer_config.json chat_template)")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        probe = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
        if not any(self.encode(probe)[1][0]):
            raise DataError(
                "the chat template marks no assistant tokens, so no label could be kept; the template must wrap "
                "assistant turns in {% generation %} ... {% endgeneration %} (see elo_ray.tiny.CHAT_TEMPLATE)"
            )

    def encode(self, conversations: list[list[dict]]) -> tuple[list[list[int]], list[list[int]]]:
        out = self.tokenizer.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return out["input_ids"], out["assistant_masks"]

    def __call__(self, conversations: list[list[dict]]):
        """(input_ids [n, L], labels [n, L], tokens [n], truncated, without assistant tokens)."""
        L = self.seq_len
        ids_rows, label_rows, tokens = [], [], []
        truncated = empty = 0
        for ids, mask in zip(*self.encode(conversations)):
            if len(ids) > L:
                truncated += 1
                ids, mask = ids[:L], mask[:L]
            mask = np.asarray(mask, dtype=bool)
            if not mask.any():
                empty += 1
                continue
            row = np.full(L, self.pad, dtype=np.int32)
            row[: len(ids)] = ids
            lab = np.full(L, IGNORE, dtype=np.int32)
            lab[: len(ids)] = np.where(mask, row[: len(ids)], IGNORE)
            ids_rows.append(row)
            label_rows.append(lab)
            tokens.append(len(ids))
        shape = (len(ids_rows), L)
        stack = lambda rows: np.stack(rows) if rows else np.empty(shape, dtype=np.int32)  # noqa: E731
        return stack(ids_rows), stack(label_rows), np.asarray(tokens, dtype=np.int32), truncated, empty


def doc_key(doc) -> int:
    """A 64-bit fingerprint of a document (text or messages), to keep held-out ones out of training."""
    text = doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")


_CACHE: dict[str, object] = {}


def cached_encoder(ref):
    """The encoder (DocEncoder or ChatEncoder) behind object ref `ref`, fetched once per process."""
    key = ref.hex()
    if key not in _CACHE:
        import ray

        # Parallelism comes from Ray's tasks; Rust threads inside each task would oversubscribe.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]
