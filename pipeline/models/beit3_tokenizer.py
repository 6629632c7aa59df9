"""The BEiT-3 tokenizer: XLM-R ids over a sentencepiece model, reproduced with sentencepiece directly.

XLM-R's (fairseq's) id mapping: <s> = 0, <pad> = 1, </s> = 2, <unk> = 3, and every other piece gets its
sentencepiece id + 1 (sentencepiece's own unk, id 0, becomes 3). A caption is <s> + ids + </s>, with the ids cut
so that the whole fits max_len, then padded with <pad>. The padding mask is 1 on padding (the reverse of Hugging
Face's attention_mask), as the official BEiT-3 code feeds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import sentencepiece
import torch

from pipeline.errors import DsmdError

__all__ = ["BOS_ID", "PAD_ID", "EOS_ID", "UNK_ID", "BEiT3Tokenizer", "file_sha256"]

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_FAIRSEQ_OFFSET = 1


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class BEiT3Tokenizer:
    def __init__(self, spm_path: str | Path, max_len: int = 64) -> None:
        self.path = Path(spm_path)
        if not self.path.is_file():
            raise DsmdError(f"{self.path}: sentencepiece model not found (set teacher.tokenizer to beit3.spm)")
        if max_len < 2:
            raise DsmdError(f"max_text_len {max_len} leaves no room for <s> and </s>")
        self.max_len = max_len
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise DsmdError(f"{self.path}: not a sentencepiece model ({exc})") from None

    def __getstate__(self) -> dict:
        # SentencePieceProcessor is rebuilt from the file in DataLoader workers.
        return {"path": self.path, "max_len": self.max_len}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["max_len"])

    @property
    def vocab_size(self) -> int:
        """One more than the largest id this tokenizer emits (XLM-R adds <mask> after it; unused here)."""
        return self._sp.GetPieceSize() + _FAIRSEQ_OFFSET

    def sha256(self) -> str:
        return file_sha256(self.path)

    def piece_ids(self, text: str) -> list[int]:
        """The caption's ids in XLM-R numbering, without <s> / </s> and without truncation."""
        if not isinstance(text, str):
            raise DsmdError(f"caption must be a string, got {type(text).__name__}: {text!r}")
        return [i + _FAIRSEQ_OFFSET if i else UNK_ID for i in self._sp.EncodeAsIds(text)]

    def encode(self, text: str) -> list[int]:
        """<s> + ids + </s>, cut to max_len (an empty caption gives just <s></s>)."""
        return [BOS_ID, *self.piece_ids(text)[: self.max_len - 2], EOS_ID]

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"text_ids": (N, max_len) int64, "padding_mask": (N, max_len) int64, 1 on padding}."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_len), PAD_ID, dtype=torch.long)
        mask = torch.ones((len(texts), self.max_len), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 0
        return {"text_ids": ids, "padding_mask": mask}
