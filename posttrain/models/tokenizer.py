"""The project's own tokenizer: byte-level BPE trained from shipped text, with a ChatML template.

Why: tests, examples and the quickstart must run with no model hub. A byte-level BPE covers every
string (no unknown tokens), splitting digits one by one makes arithmetic tokenize digit by digit
(so the built-in arithmetic task is learnable by a tiny model), and the ChatML special tokens make
conversational data work out of the box.

The trained tokenizer is cached on disk under ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``)
in ``tokenizer-<vocab>-<hash>/``, where the hash covers the corpus and the training recipe, so a
repeat call only reads a small JSON file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "IM_END",
    "IM_START",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "cache_dir",
    "corpus_path",
]

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]

# Bump when the training recipe changes, so stale caches are not reused.
_RECIPE_VERSION = "bpe-bytelevel-digits-v1"

# ChatML. Assistant content and its end-of-turn token sit inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly them.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def corpus_path() -> Path:
    """Path of the shipped training text (original prose, dialogues, arithmetic, code)."""
    return Path(__file__).with_name("assets") / "corpus.txt"


def cache_dir() -> Path:
    """Root of the posttrain on-disk cache: ``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``."""
    root = os.environ.get("POSTTRAIN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "posttrain"


def _fingerprint(corpus: bytes, vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(_RECIPE_VERSION.encode())
    h.update(str(vocab_size).encode())
    h.update(corpus)
    return h.hexdigest()[:16]


def _train_backend(text: str, vocab_size: int) -> Tokenizer:
    """Train the raw `tokenizers.Tokenizer`; deterministic for a given text and vocab size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets cover a token's leading space, so they tile the text exactly.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One "document" per line keeps the training input order fixed.
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Return the project tokenizer with `vocab_size` entries (3 special + 256 bytes + merges).

    The first call trains it from the shipped corpus (well under a second) and saves it to the
    cache; later calls load the cached copy. Each call returns a fresh object, so callers may
    change it (e.g. padding side) without affecting others.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    corpus = corpus_path().read_bytes()
    target = cache_dir() / f"tokenizer-{vocab_size}-{_fingerprint(corpus, vocab_size)}"
    if (target / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(target))
        except Exception:  # a corrupt cache entry: rebuild it below
            pass
    tokenizer = _wrap(_train_backend(corpus.decode("utf-8"), vocab_size))
    _save_atomically(tokenizer, target)
    return tokenizer


def _save_atomically(tokenizer: PreTrainedTokenizerFast, target: Path) -> None:
    """Save to a temporary sibling folder, then rename: concurrent callers never see half a cache."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    except OSError:  # read-only home etc.: the cache is an optimisation only
        pass
