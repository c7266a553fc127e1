"""What a prompt may be (text, chat messages, token ids, or a list of these) and the ids
that end an answer."""

from __future__ import annotations

from typing import Sequence

from .errors import InfLLMLiteError
from .models.transformer import Transformer
from .tokenizer import Tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[dict] | Sequence[int]) -> list[int]:
    """A string is encoded as is (with the tokenizer's special tokens, e.g. BOS); a list of
    chat messages goes through the checkpoint's chat template; token ids are used as given."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InfLLMLiteError("the prompt is empty")
        return tokenizer.encode(prompt)
    if not prompt:
        raise InfLLMLiteError("the prompt is empty (no chat messages)")
    if all(isinstance(t, int) for t in prompt):
        return list(prompt)
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(model: Transformer, tokenizer: Tokenizer) -> set[int]:
    """The ids that end an answer: the tokenizer's (EOS, the template's end of turn) and
    the model config's EOS ids."""
    return set(tokenizer.stop_token_ids) | set(model.args.eos_token_ids)


def is_prompt_list(prompt) -> bool:
    """Whether ``prompt`` is several prompts (a list of strings, of message lists or of id
    lists) rather than one (a string, one conversation's messages, one list of ids)."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, (str, list, tuple)) for p in prompt))
