"""T-Free word tokenizer exported by megatron_tfree (Hugging Face remote code; transformers only).

Text -> words with T-Free's lossless word splitter (``tfree_words.py``; whitespace becomes the marker
words ``<|ws|>``, ``<|no_ws|>``, ``<|\\n|>`` ...), words -> ids: a dictionary word's index in
``tfree_vocab.json``, any other word the next free id of the process-wide extra-word table
(``configuration_tfree.extra_words``), which this folder's model reads, so every text is encoded
exactly. ``decode`` is the exact inverse (``words_to_text``). No special tokens are added around a
text; padding uses ``<|endoftext|>`` on the left (for batched generation). An empty text is
``<|endoftext|>``, the context every document starts from.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from transformers import PreTrainedTokenizer

from .configuration_tfree import extra_words
from .tfree_words import END_OF_TEXT, text_to_words, words_to_text

VOCAB_FILE = "tfree_vocab.json"


class TFreeTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, dictionary_fingerprint: str = "", lowercase: bool = False,
                 eos_token: str = END_OF_TEXT, bos_token: str = END_OF_TEXT, pad_token: str = END_OF_TEXT, **kwargs):
        with open(vocab_file, encoding="utf-8") as f:
            self.words: list[str] = json.load(f)["words"]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.lowercase = lowercase
        self.dictionary_fingerprint = dictionary_fingerprint
        self.extra = extra_words(dictionary_fingerprint, len(self.words))
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(eos_token=eos_token, bos_token=bos_token, pad_token=pad_token,
                         dictionary_fingerprint=dictionary_fingerprint, lowercase=lowercase, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def __len__(self) -> int:
        return len(self.words) + len(self.extra)

    def get_vocab(self) -> dict[str, int]:
        return {**self.index, **self.extra.ids}

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return text_to_words(text, lowercase=self.lowercase) or [END_OF_TEXT]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        i = self.index.get(token)
        return i if i is not None else self.extra.id_of(token)

    def _convert_token_to_id_with_added_voc(self, token: str) -> int:
        return self._convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.words[index] if index < len(self.words) else self.extra.word(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return words_to_text(list(tokens))

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None):
        return token_ids_0 + (token_ids_1 or [])

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"words": self.words}, f, ensure_ascii=False)
        return (path,)
