"""A ``tokenizers`` tokenizer.json built from a GGUF's ``tokenizer.*`` metadata.

llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``), the BPE merges, each token's
type and the name of the pre-tokenizer (``tokenizer.ggml.pre``), not a tokenizer.json.
Supported: byte-level BPE (``tokenizer.ggml.model = gpt2``: SmolLM, Llama 3, Qwen2) and
SentencePiece BPE (``llama``: Llama 2, Mistral), with merges derived from the scores when
the file has none.

Where transformers' GGUF tokenizer and llama.cpp disagree we follow llama.cpp, which is
what the file's vocabulary was built for: for the ``smollm`` (and StarCoder-style)
pre-tokenizer llama.cpp isolates every numeric character before GPT-2's regex, exactly as
SmolLM2's own tokenizer.json does (``Digits(individual_digits=True)`` then ``ByteLevel``);
transformers applies GPT-2's regex alone and so differs on e.g. ``"x  0"`` and ``" ½"``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..errors import InfLLMLiteError

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> how to split text before BPE.
# "\p{N}" then GPT-2's regex (llama-vocab.cpp): HF's Digits(individual_digits) + ByteLevel.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}
_GPT2 = {None, "default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _byte_level_pre_tokenizer(pre: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2:
        warnings.warn(f"{path.name}: unknown pre-tokenizer {pre!r}, splitting text like GPT-2", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _byte_level_tokenizer(meta: dict, tokens: list[str], path: Path):
    """Byte-level BPE (llama.cpp ``gpt2`` tokenizer model) as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):  # a token outside the byte alphabet is respelled, as transformers does
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(key, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre")
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre, path)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _special_token_list(tokens, types, byte_level: bool) -> list[dict]:
    """tokenizer.json ``added_tokens``: CONTROL tokens special, USER_DEFINED ones plain but whole."""
    alphabet = set(bytes_to_unicode().values())
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind not in (CONTROL, USER_DEFINED) or not tok:
            continue
        if byte_level and kind == CONTROL and not set(tok) <= alphabet:
            continue  # a llama.cpp mislabel (transformers skips these too)
        added.append(
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": kind == CONTROL,
            }
        )
    return added


def _token(meta: dict, tokens: list[str], key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None


def build_tokenizer(meta: dict, path: Path) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) from a GGUF's ``tokenizer.*`` metadata."""
    from tokenizers import Tokenizer, processors

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise InfLLMLiteError(f"{path} has no tokenizer (no tokenizer.ggml.tokens): cannot build one")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_tokenizer(meta, tokens, path)
    elif kind == "llama":
        tokenizer = _sentencepiece_tokenizer(meta, tokens, types)
    else:
        raise InfLLMLiteError(
            f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)"
        )

    bos, eos = _token(meta, tokens, "bos_token_id"), _token(meta, tokens, "eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        special = [(t, tokens.index(t)) for t in {bos, eos} if (t == bos and add_bos) or (t == eos and add_eos)]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = _special_token_list(tokens, types, byte_level=kind == "gpt2")
    text = json.dumps(data, ensure_ascii=False)
    try:
        Tokenizer.from_str(text)
    except Exception as e:
        raise InfLLMLiteError(f"{path}: the tokenizer built from its metadata is invalid ({e})") from e

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": _token(meta, tokens, "unknown_token_id"),
        "pad_token": _token(meta, tokens, "padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 0)) or None,
    }
    if template := meta.get("tokenizer.chat_template"):
        config["chat_template"] = template
    return text, config


def _sentencepiece_merges(tokens: list[str], scores: list[float], vocab: dict) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: best-scored merged token first."""
    found = []
    for tok, score in zip(tokens, scores):
        pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in vocab and tok[i:] in vocab]
        pairs.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        found += [(a, b, score) for a, b in pairs]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _sentencepiece_tokenizer(meta: dict, tokens: list[str], types: list[int]):
    """SentencePiece BPE (llama.cpp ``llama`` tokenizer model: Llama 2, Mistral) with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if merges := meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        merges = _sentencepiece_merges(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens), vocab)
    unk = _token(meta, tokens, "unknown_token_id")
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer
