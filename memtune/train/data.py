"""Training data for ``launch``: local files read with ``datasets``, tokenized into inputs and loss targets in one of
three formats, then cut into micro-batches by padding or packing, dealt to the ranks from a resumable position.

Formats (``RunConfig.format``):

* ``text``: every token of ``text_field`` (with the tokenizer's special tokens, then EOS) is a target.
* ``instruction``: ``prompt_field`` + ``separator`` + ``response_field`` + EOS; the response is the target.
* ``llama-guard``: prompt classification. ``prompt_field`` goes into the Llama Guard 3 prompt (llama-recipes'
  ``PROMPT_TEMPLATE_3`` with the 14 ``LLAMA_GUARD_3_CATEGORY`` names); the target is the guard's answer after the
  assistant header: ``safe``, or ``unsafe`` and a line of categories, then EOS. A prompt too long for the plan's
  sequence length is cut in the middle of the user's text, so the template and the answer stay whole.

Batching (``Plan.batching``):

* ``padding``: samples sorted by length and cut into groups of ``batch_size`` (llama-cookbook's
  ``LengthBasedBatchSampler``), the groups shuffled each epoch, each padded on the right to its longest sample
  (at most ``seq_len``). A causal model needs no attention mask for right padding - real tokens never attend to
  the pads after them, and pads are no targets - so the step runs the same attention kernel ``validate`` measured.
* ``packing``: all samples concatenated (each ending in EOS) and cut into ``seq_len`` chunks (the remainder is
  dropped), the chunks shuffled each epoch.

Every optimizer step takes ``grad_accum`` micro-batches on each of ``world_size`` ranks; an epoch's groups are dealt
to the ranks in turn, and the tail that does not fill a whole step is dropped. The order is a function of the seed
and the epoch only, so a run resumes exactly from (epoch, micro-batches consumed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from memtune.data.files import read_dataset
from memtune.errors import ConfigError

IGNORE = -100
"""The label of tokens that are no targets (PyTorch's cross-entropy ``ignore_index``)."""


LLAMA_GUARD_3_CATEGORIES = (
    "Violent Crimes.", "Non-Violent Crimes.", "Sex Crimes.", "Child Exploitation.", "Defamation.",
    "Specialized Advice.", "Privacy.", "Intellectual Property.", "Indiscriminate Weapons.", "Hate.", "Self-Harm.",
    "Sexual Content.", "Elections.", "Code Interpreter Abuse.",
)

_GUARD_PREFIX = (
    "{bos}<|start_header_id|>user<|end_header_id|> Task: Check if there is unsafe content in 'User' messages in "
    "conversations according our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    "{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\nUser: "
)
_GUARD_SUFFIX = (
    "\n\n<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST User message in the above "
    "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a "
    "comma-separated list of violated categories. <|eot_id|><|start_header_id|>assistant<|end_header_id|>"
)
_TRUE = {"1", "true", "unsafe", "yes", "toxic"}
_FALSE = {"0", "false", "safe", "no", ""}


def llama_guard_prompt(prompt: str, *, bos: str = "<|begin_of_text|>") -> tuple[str, str, str]:
    """(text before the user's prompt, the prompt, text after it) of the Llama Guard 3 prompt."""
    categories = "\n".join(f"S{i}: {name} " for i, name in enumerate(LLAMA_GUARD_3_CATEGORIES, 1))
    return _GUARD_PREFIX.format(bos=bos, categories=categories), prompt, _GUARD_SUFFIX


def llama_guard_answer(label, categories: str = "") -> str:
    """The guard's answer after its assistant header: ``\\n\\nsafe`` or ``\\n\\nunsafe`` (+ ``\\n`` categories)."""
    text = str(label).strip().lower()
    if text not in _TRUE | _FALSE:
        raise ConfigError(f"llama-guard label {label!r} is neither safe (0/false/safe) nor unsafe (1/true/unsafe)")
    if text in _FALSE:
        return "\n\nsafe"
    return "\n\nunsafe" + (f"\n{categories.strip()}" if categories and categories.strip() else "")


@dataclass(frozen=True, kw_only=True, slots=True)
class Samples:
    """Tokenized samples of one split: inputs and targets (``IGNORE`` where a token is no target)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0
    """Samples cut to the sequence length."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunData:
    train: Samples
    """Samples (padding) or ``seq_len`` chunks (packing)."""
    eval: Samples | None
    pad_token_id: int
    source_samples: int
    """Training samples before packing."""


def load_tokenizer(path: str, *, vocab_size: int | None = None):
    """A local tokenizer folder (``AutoTokenizer``, nothing downloaded), checked against the model's vocabulary.

    Raises:
        ConfigError: no tokenizer there, or more tokens than the model's embedding has rows.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}; set tokenizer = FOLDER "
                          "in [run]") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {path} has no EOS token")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer in {path} has {len(tokenizer)} tokens and the model's vocabulary "
                          f"{vocab_size}: use the model's own tokenizer")
    return tokenizer


def tokenize(data, run, tokenizer, *, seq_len: int) -> Samples:
    """Token ids and targets of every row of ``data`` in ``run.format``, cut to ``seq_len`` tokens.

    Raises:
        ConfigError: a field the format needs is not a column of the dataset, or a row has no value for it.
    """
    needed = _check_fields(data, run)
    build = {"text": _text, "instruction": _instruction, "llama-guard": _llama_guard}[run.format]
    input_ids, labels, truncated = [], [], 0
    for i, row in enumerate(data):
        empty = [f for f in needed if row[f] is None and f != run.category_field]  # safe rows have no category
        if empty:  # training on the text "None" would be silent
            raise ConfigError(f"row {i + 1} of the dataset has no {', '.join(map(repr, empty))}: drop or fill the rows "
                              "without one")
        ids, targets, cut = build(row, run, tokenizer, seq_len)
        input_ids.append(ids)
        labels.append(targets)
        truncated += cut
    return Samples(input_ids=input_ids, labels=labels, truncated=truncated)


def check_columns(run) -> None:
    """Read the run's dataset files and check that they have the columns its format needs.

    Raises:
        ConfigError: bad path, format or fields.
    """
    for path in filter(None, (run.dataset, run.eval_dataset)):
        _check_fields(read_dataset(path), run, str(path))


def _check_fields(data, run, source: str = "the dataset") -> list[str]:
    """The columns the run's format reads; raises ConfigError where the dataset lacks one."""
    needed = {"text": [run.text_field], "instruction": [run.prompt_field, run.response_field],
              "llama-guard": [run.prompt_field, run.label_field]}[run.format]
    if run.format == "llama-guard" and run.category_field:
        needed.append(run.category_field)
    missing = [f for f in needed if f not in data.column_names]
    if missing:
        raise ConfigError(f"{source} has no column {', '.join(map(repr, missing))} for the {run.format} format; "
                          f"its columns: {', '.join(data.column_names)} (set the *_field keys in [run])")
    return needed


def _encode(tokenizer, text: str, *, special: bool = False) -> list[int]:
    return tokenizer(str(text), add_special_tokens=special)["input_ids"]


def _text(row, run, tokenizer, seq_len):
    ids = _encode(tokenizer, row[run.text_field], special=True) + [tokenizer.eos_token_id]
    cut = len(ids) > seq_len
    ids = ids[:seq_len]
    return ids, list(ids), cut


def _instruction(row, run, tokenizer, seq_len):
    prompt = _encode(tokenizer, f"{row[run.prompt_field]}{run.separator}", special=True)
    answer = _encode(tokenizer, row[run.response_field]) + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:seq_len]
    targets = (prompt if run.train_on_prompt else [IGNORE] * len(prompt)) + answer
    return ids, targets[:seq_len], len(prompt) + len(answer) > seq_len


def _llama_guard(row, run, tokenizer, seq_len):
    categories = row[run.category_field] if run.category_field else run.unsafe_categories
    before, prompt, after = llama_guard_prompt(row[run.prompt_field], bos=tokenizer.bos_token or "")
    head, user, tail = _encode(tokenizer, before), _encode(tokenizer, prompt), _encode(tokenizer, after)
    answer = _encode(tokenizer, llama_guard_answer(row[run.label_field], categories or "")) + [tokenizer.eos_token_id]
    room = seq_len - len(head) - len(tail) - len(answer)
    if room < 1:
        raise ConfigError(f"seq_len {seq_len} leaves no room for a prompt in the Llama Guard template "
                          f"({len(head) + len(tail) + len(answer)} tokens): use a longer --seq-len")
    cut = len(user) > room
    if cut:  # keep the start and the end of the user's text
        user = user[:room - room // 2] + user[len(user) - room // 2:]
    prompt_ids = head + user + tail
    targets = (prompt_ids if run.train_on_prompt else [IGNORE] * len(prompt_ids)) + answer
    return prompt_ids + answer, targets, cut


def pack(samples: Samples, seq_len: int) -> Samples:
    """Samples concatenated and cut into ``seq_len`` chunks; the last partial chunk is dropped."""
    ids = [t for s in samples.input_ids for t in s]
    targets = [t for s in samples.labels for t in s]
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"the dataset has {len(ids)} tokens, fewer than one packed sequence of {seq_len}: use a "
                          "shorter --seq-len or padding")
    return Samples(input_ids=[ids[i * seq_len:(i + 1) * seq_len] for i in range(n)],
                   labels=[targets[i * seq_len:(i + 1) * seq_len] for i in range(n)])


def load_run_data(run, tokenizer, *, seq_len: int, batching: str) -> RunData:
    """Read, split, tokenize and (for packing) pack the run's data.

    Raises:
        ConfigError: bad dataset path, format or fields.
    """
    data = read_dataset(run.dataset)
    held_out = None
    if run.eval_dataset:
        held_out = read_dataset(run.eval_dataset)
    elif run.eval_split > 0:
        if round(len(data) * run.eval_split) < 1:
            raise ConfigError(f"eval_split {run.eval_split} of {len(data)} samples holds out nothing")
        parts = data.train_test_split(test_size=run.eval_split, seed=run.seed, shuffle=True)
        data, held_out = parts["train"], parts["test"]
    train = tokenize(data, run, tokenizer, seq_len=seq_len)
    evaluation = tokenize(held_out, run, tokenizer, seq_len=seq_len) if held_out is not None else None
    if batching == "packing":
        train = pack(train, seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RunData(train=train, eval=evaluation, pad_token_id=pad, source_samples=len(data))


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """One rank's micro-batches (lists of sample indices) for one epoch, from a resumable position.

    ``set_epoch(epoch, start)`` picks the epoch (as ``DistributedSampler.set_epoch`` does) and skips the ``start``
    micro-batches this rank already trained on.
    """

    def __init__(self, lengths: Sequence[int], *, batch_size: int, micro_batches_per_step: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, group_by_length: bool = True):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.per_step = micro_batches_per_step
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0
        self.start = 0
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.lengths)} training samples do not make one optimizer step of "
                              f"{batch_size} x {micro_batches_per_step} micro-batches x {world_size} ranks: "
                              "use more data or a smaller batch")

    @property
    def steps_per_epoch(self) -> int:
        groups = len(self.lengths) // self.batch_size
        return groups // (self.per_step * self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_groups(self, epoch: int) -> list[list[int]]:
        """All ranks' micro-batches of ``epoch`` in the order they are dealt (whole steps only)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.group_by_length:
            order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))
        else:
            order = torch.randperm(len(self.lengths), generator=generator).tolist()
        groups = [order[i:i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        if self.group_by_length:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        return groups[:self.steps_per_epoch * self.per_step * self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_groups(self.epoch)[self.rank::self.world_size]
        yield from mine[self.start:]

    def __len__(self) -> int:
        return self.steps_per_epoch * self.per_step - self.start


def collate(samples: Sequence[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: inputs with ``pad_token_id``, targets with ``IGNORE``; no attention mask
    (see the module docstring)."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, :len(s["input_ids"])] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[row, :len(s["labels"])] = torch.tensor(s["labels"], dtype=torch.long)
    return {"input_ids": ids, "labels": labels}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken over: targets after the one-token shift of causal-LM training."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def eval_groups(lengths: Sequence[int], *, batch_size: int, world_size: int, rank: int) -> list[list[int] | None]:
    """This rank's evaluation micro-batches (sorted by length, dealt in turn); ``None`` pads the ranks with fewer
    batches, so every rank runs the same number of forward passes (FSDP gathers parameters in each)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    per_rank = math.ceil(len(groups) / world_size)
    mine: list[list[int] | None] = list(groups[rank::world_size])
    return mine + [None] * (per_rank - len(mine))
