"""A llama-cookbook ``custom_dataset`` for ``bench/cookbook.py``: the longest ToxicChat prompt in the Llama Guard 3
template (925 prompt tokens + 214 template tokens = 1,139), repeated, so that every step runs at the shape that sets
the seed case's peak (padding), and enough of them for three steps of four 4,096-token chunks when packed. Random token ids: the model is a random init, only the shapes matter."""

import torch

LONGEST = 925 + 214
SAMPLES = 48


def get_custom_dataset(dataset_config, tokenizer, split):
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    rows = []
    for _ in range(SAMPLES):
        ids = torch.randint(3, len(tokenizer), (LONGEST,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * LONGEST, "labels": ids})
    return rows
