"""Tokenizers come from transformers: an HF directory's tokenizer files or a GGUF file's vocabulary."""

from __future__ import annotations

import os

from cpmtool.errors import ModelError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(name_or_path: str | os.PathLike):
    """The HF tokenizer of a registry name, HF directory or .gguf file.

    Raises:
        ModelError: the model has no tokenizer files or they cannot be read.
    """
    from transformers import AutoTokenizer

    from cpmtool.model.loader import resolve

    path = resolve(name_or_path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from cpmtool.model.gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    if not (path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES)):
        raise ModelError(f"no tokenizer in {path} (expected one of {', '.join(_TOKENIZER_FILES)})")
    try:
        # AutoTokenizer also reads config.json and warns that model_type "minicpm" is unknown to
        # transformers; the tokenizer itself is a plain fast tokenizer, so silence that one warning
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load the tokenizer in {path}: {' '.join(str(e).split())}") from e


def chat_prompt(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """`messages` ([{"role", "content"}, ...]) rendered by the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise ModelError(f"{name} has no chat template; give a plain `prompt` instead of `messages`")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the chat-templated prompt; the template already holds any BOS, so none is added."""
    text = chat_prompt(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)
