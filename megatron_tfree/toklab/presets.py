"""Pre-tokenisation presets for byte-level BPE (after Dagan, Synnaeve, Roziere 2024, arXiv 2402.01035).

A preset is the regex that cuts text into pre-tokens before BPE merges within them:

* ``gpt4``: cl100k-style (case-insensitive contractions, letters with one leading non-letter, numbers of
  1-3 digits, punctuation runs with trailing newlines, whitespace handling); ``gpt4-num2``: numbers of
  1-2 digits.
* ``punct``: letters with an optional leading space, numbers of 1-3 digits, punctuation runs, whitespace;
  ``punct-num2``: numbers of 1-2 digits.
* ``gpt2``: GPT-2's own pattern (the byte-level pre-tokenizer's built-in regex).
* ``identity``: no split at all (byte-level only: merges may cross words).

Any other regex is a custom preset. :func:`identify` reads the preset back from a ``tokenizer.json``.
"""

from __future__ import annotations

from typing import Any, Optional

GPT4 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PUNCT = r" ?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # ByteLevel's own
PRESETS: dict[str, Optional[str]] = {
    "gpt4": GPT4,
    "gpt4-num2": GPT4.replace(r"\p{N}{1,3}", r"\p{N}{1,2}"),
    "punct": PUNCT,
    "punct-num2": PUNCT.replace(r"\p{N}{1,3}", r"\p{N}{1,2}"),
    "gpt2": None,  # the ByteLevel pre-tokenizer's own regex
    "identity": None,  # no split
}


def pre_tokenizer(preset: Optional[str] = None, regex: Optional[str] = None) -> Any:
    """The ``tokenizers`` pre-tokenizer of a preset name or a custom ``regex`` (exactly one of them)."""
    from tokenizers import Regex, pre_tokenizers

    if (preset is None) == (regex is None):
        raise ValueError("give a preset or a regex (one of them)")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if preset == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if preset == "identity":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pattern = PRESETS[preset] if preset is not None else regex
    try:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    except Exception as e:  # the Rust regex engine's message
        raise ValueError(f"invalid pre-tokenisation regex {pattern!r}: {e}") from None
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def identify(config: dict[str, Any]) -> str:
    """The preset of a ``tokenizer.json`` (as a dict): a preset name, ``custom`` or ``unknown``."""
    pt = config.get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel":
        return "gpt2" if pt.get("use_regex", True) else "identity"
    if pt.get("type") == "Sequence":
        for part in pt.get("pretokenizers", []):
            pattern = (part.get("pattern") or {}).get("Regex") if part.get("type") == "Split" else None
            if pattern is not None:
                return next((name for name, rx in PRESETS.items() if rx == pattern), "custom")
    return "unknown"
