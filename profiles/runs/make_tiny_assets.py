"""Rebuild the tiny CPU run's assets from a ToxicChat JSONL file (``user_input``, ``toxicity``, ``jailbreaking``):

* ``data/toxicchat-mini.jsonl``: 400 short prompts (at most 160 characters) in source order: every toxic one up to
  120, the rest non-toxic;
* ``tiny-llama-guard/tokenizer.json`` (+ ``tokenizer_config.json``): a 512-token byte-level BPE trained on those
  prompts inside the Llama Guard 3 prompt, with Llama 3's special tokens, so the template costs few tokens.

    python profiles/runs/make_tiny_assets.py PATH/TO/toxicchat/train.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

MAX_CHARS = 160
ROWS = 400
TOXIC = 120
VOCAB = 512
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|finetune_right_pad_id|>"]


def subset(source: Path) -> list[dict]:
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    short = [r for r in rows if len(r["user_input"]) <= MAX_CHARS]
    toxic = [r for r in short if r["toxicity"]][:TOXIC]
    keep = {id(r) for r in toxic}
    keep |= {id(r) for r in [r for r in short if not r["toxicity"]][:ROWS - len(toxic)]}
    return [r for r in short if id(r) in keep]


def train_tokenizer(rows: list[dict], folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from memtune.train.data import llama_guard_answer, llama_guard_prompt

    texts = []
    for r in rows:
        before, prompt, after = llama_guard_prompt(r["user_input"], bos="")
        texts.append(before + prompt + after + llama_guard_answer(r["toxicity"]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>")
    fast.save_pretrained(folder)


def main(source: str) -> None:
    rows = subset(Path(source))
    out = HERE / "data" / "toxicchat-mini.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    train_tokenizer(rows, HERE / "tiny-llama-guard")
    print(f"{len(rows)} rows ({sum(r['toxicity'] for r in rows)} toxic) -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
