"""A text-like data function in the Hugging Face style: what `data.name: "hf_data:token_majority"` names.

Each example is a dict ``{"input_ids": LongTensor, "labels": int}`` of its own length, and the function
returns a fourth item, the `collate_fn` that pads a list of examples into one batch dict
(``input_ids``, ``attention_mask``, ``labels``), as ``transformers.DataCollatorWithPadding`` does with a
tokenizer. oialr-tune calls the model as ``model(**batch_without_labels)`` and scores its ``.logits``
against ``labels``.

The sequences are random tokens with a learnable rule (sequence classification, nothing downloaded):
each draws its tokens from the low half of the vocabulary with probability 0.25 or 0.75, and its
label says which (1: mostly low tokens). Counting tokens gives about 95 % accuracy, chance is 50 %.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

PAD, CLS = 0, 1  # token 0 pads, token 1 starts every sequence (BERT's [CLS])


class TokenSequences(Dataset):
    """`n` random token sequences of length `min_len`..`max_len` (with the leading CLS) and their labels."""

    def __init__(self, n: int, vocab_size: int, min_len: int, max_len: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        low = torch.arange(2, 2 + (vocab_size - 2) // 2)
        high = torch.arange(2 + (vocab_size - 2) // 2, vocab_size)
        self.examples: list[dict[str, Any]] = []
        for _ in range(n):
            label = int(torch.randint(0, 2, (1,), generator=g))
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            from_low = torch.rand(length - 1, generator=g) < (0.75 if label else 0.25)
            tokens = torch.where(from_low, low[torch.randint(len(low), (length - 1,), generator=g)],
                                 high[torch.randint(len(high), (length - 1,), generator=g)])
            self.examples.append({"input_ids": torch.cat([torch.tensor([CLS]), tokens]), "labels": label})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


def pad_batch(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad `input_ids` on the right to the batch's longest sequence; mask the padding out."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), PAD, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = e["input_ids"]
        mask[row, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


def token_majority(n_train: int = 512, n_test: int = 256, vocab_size: int = 32, min_len: int = 8,
                   max_len: int = 16, seed: int = 0):
    """(train, None, test, pad_batch): val is carved from train by oialr-tune (``data.split_seed``)."""
    train = TokenSequences(n_train, vocab_size, min_len, max_len, seed)
    test = TokenSequences(n_test, vocab_size, min_len, max_len, seed + 1)
    return train, None, test, pad_batch
