"""SAEBench-style evaluations of a finished run, offline (docs/math.md §5): density and decoder
structure, sparse probing on labelled text (the speeches of the embedded Shakespeare by default:
genre, play, speaker), and feature absorption where the model can spell. `evaluate_run` returns
what results.py writes to RUN/eval.json and the report."""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from capture import is_causal_lm, run_to_hooks
from config import SYNTHETIC_DATASET, resolve_device
from dashboards import get_model
from logs import Run, as_run
from metrics import PROBE_KS, sparse_probing, structure_metrics
from text import LabelledText, labelled_documents, shakespeare_speeches, special_token_ids

SHAKESPEARE_LABELS = ("genre", "play", "speaker")
PROBE_CLASSES = 8  # a label set's most frequent classes, each one binary task against the others
PROBE_TRAIN_PER_CLASS = 250  # examples drawn per class and split
PROBE_TEST_PER_CLASS = 60
PROBE_MIN_TEST = 20  # a class with fewer held-out examples would give a too noisy accuracy
PROBE_TEST_GROUPS = 0.2  # fraction of each play's scenes (a dataset's rows) held out, whole
PROBE_MIN_CHARS = 100  # shorter speeches ("Ay, my lord.") carry next to nothing of their labels
PROBE_TOKENS = 64  # an example's row: start token + its first 63 tokens (at most seq_len)
PROBE_DATASET_ROWS = 20_000  # rows read from a Hugging Face dataset for probing


class ProbeTask(NamedTuple):
    name: str  # the class told apart from the others
    train: list[int]  # example indices
    y_train: list[int]  # 1: the class, 0: another class
    test: list[int]
    y_test: list[int]


def held_out_groups(examples: list[LabelledText], fraction: float, seed: int) -> list[bool]:
    """Per example whether it is held out: in each stratum a seeded `fraction` of its groups,
    whole (so every play has scenes on both sides)."""
    strata: dict[str, set[str]] = defaultdict(set)
    for e in examples:
        strata[e.stratum].add(e.group)
    rng, test = random.Random(seed), set()
    for stratum in sorted(strata):
        groups = sorted(strata[stratum])
        rng.shuffle(groups)
        test |= set(groups[:round(fraction * len(groups))])
    return [e.group in test for e in examples]


def one_vs_rest_tasks(labels: list[str | None], is_test: list[bool], seed: int) -> list[ProbeTask]:
    """For the PROBE_CLASSES classes with most training examples (and PROBE_MIN_TEST held out):
    up to PROBE_*_PER_CLASS examples per class and split, and per class a balanced binary task,
    its examples against as many drawn from the other chosen classes (chance is 0.5)."""
    rng = random.Random(seed)
    by_split: dict[bool, dict[str, list[int]]] = {False: defaultdict(list), True: defaultdict(list)}
    for i, (label, test) in enumerate(zip(labels, is_test, strict=True)):
        if label is not None:
            by_split[test][label].append(i)
    ranked = sorted(by_split[False], key=lambda c: (-len(by_split[False][c]), c))
    classes = [c for c in ranked
               if len(by_split[True].get(c, [])) >= PROBE_MIN_TEST][:PROBE_CLASSES]
    if len(classes) < 2:
        raise ValueError(f"probing needs 2 classes with {PROBE_MIN_TEST} held-out examples or "
                         f"more, found {len(classes)}: label more examples or choose another "
                         "label column")
    quota = {False: PROBE_TRAIN_PER_CLASS, True: PROBE_TEST_PER_CLASS}
    drawn = {split: {c: rng.sample(by_split[split][c], min(quota[split], len(by_split[split][c])))
                     for c in classes} for split in (False, True)}
    tasks = []
    for c in classes:
        parts: list[list[int]] = []
        for split in (False, True):
            positive = drawn[split][c]
            others = [i for o in classes if o != c for i in drawn[split][o]]
            negative = rng.sample(others, min(len(positive), len(others)))
            parts += [positive + negative, [1] * len(positive) + [0] * len(negative)]
        tasks.append(ProbeTask(c, *parts))
    return tasks


@torch.no_grad()
def pooled_activations(model, sae, texts: list[str], hook_point: str, length: int, batch: int,
                       device: str) -> tuple[Tensor, Tensor]:
    """(raw activations (n, d), SAE latents (n, m)), each the mean over an example's tokens but
    the start token (which never reaches the SAE). Each text is one row, the start token and its
    first length-1 tokens; rows of equal length are batched, so no padding changes an encoder's
    activations."""
    start, _ = special_token_ids(model.tokenizer)
    ids = model.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    rows = [[start, *x[:length - 1]] for x in ids]
    acts = torch.zeros(len(rows), sae.cfg["act_size"])
    latents = torch.zeros(len(rows), sae.cfg["dict_size"])
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches = [same[i:i + batch] for same in
               (list(g) for _, g in itertools.groupby(order, key=lambda i: len(rows[i])))
               for i in range(0, len(same), batch)]
    for chunk in tqdm(batches, desc="probe activations", leave=False):
        tokens = torch.tensor([rows[i] for i in chunk], device=device)
        x = run_to_hooks(model, tokens, [hook_point])[0][:, 1:].float()
        f = sae.encode(x.flatten(0, 1)).view(*x.shape[:2], -1)
        acts[chunk] = x.mean(1).cpu()
        latents[chunk] = f.mean(1).cpu()
    return acts, latents


def probe_examples(dataset: str | None, label_columns: list[str] | None,
                   text_column: str) -> tuple[list[LabelledText], list[str]]:
    """The labelled examples and label names: Shakespeare's speeches (at least PROBE_MIN_CHARS
    long) unless a dataset is named."""
    if dataset is None:
        speeches = [s for s in shakespeare_speeches() if len(s.text) >= PROBE_MIN_CHARS]
        return speeches, list(SHAKESPEARE_LABELS)
    if not label_columns:
        raise ValueError(f"--probe-dataset {dataset} needs --probe-labels COLUMN[,COLUMN...]")
    rows = labelled_documents(dataset, "train", text_column, label_columns, PROBE_DATASET_ROWS)
    return [r for r in rows if r.text.strip()], label_columns  # an empty text has no tokens


def probing(model, sae, examples: list[LabelledText], label_names: list[str], length: int,
            batch: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Per label set, the mean over its one-vs-rest tasks of each probe's held-out accuracy."""
    is_test = held_out_groups(examples, PROBE_TEST_GROUPS, seed)
    tasks = {name: one_vs_rest_tasks([e.labels.get(name) for e in examples], is_test, seed)
             for name in label_names}
    used = sorted({i for ts in tasks.values() for t in ts for i in t.train + t.test})
    acts, latents = pooled_activations(model, sae, [examples[i].text for i in used],
                                       sae.cfg["hook_point"], length, batch, device)
    row = {example: n for n, example in enumerate(used)}
    out = {}
    for name, label_tasks in tasks.items():
        per_class = {}
        for task in tqdm(label_tasks, desc=f"probing {name}", leave=False):
            train, test = [row[i] for i in task.train], [row[i] for i in task.test]
            labels = (torch.tensor(task.y_train), torch.tensor(task.y_test))
            per_class[task.name] = sparse_probing((latents[train], latents[test]),
                                                  (acts[train], acts[test]), labels, seed=seed)
        scores = list(per_class.values())
        out[name] = {
            "classes": list(per_class), "train_examples": sum(len(t.train) for t in label_tasks),
            "test_examples": sum(len(t.test) for t in label_tasks),
            "sae": {k: sum(s.sae[k] for s in scores) / len(scores) for k in PROBE_KS},
            "random": {k: sum(s.random[k] for s in scores) / len(scores) for k in PROBE_KS},
            "dense": sum(s.dense for s in scores) / len(scores),
            "per_class": {c: s._asdict() for c, s in per_class.items()},
        }
    return out


def absorption(model, model_name: str) -> dict[str, str]:
    """First-letter feature absorption needs a causal LM that spells; not implemented here yet."""
    if not is_causal_lm(model):
        return {"skipped": f"{model_name} is not a causal LM: first-letter absorption needs a "
                           "model that predicts a word's spelling"}
    return {"skipped": "not implemented: first-letter absorption on causal LMs is not written yet"}


def evaluate_run(run: str | Run, device: str = "auto", dataset: str | None = None,
                 label_columns: list[str] | None = None, text_column: str = "text") -> dict:
    """Every evaluation above on a finished run's final SAE; a part that does not apply holds
    `skipped` and the reason."""
    run, device = as_run(run), resolve_device(device)
    began = time.perf_counter()
    cfg, sae = run.cfg, run.sae(device)
    out: dict[str, Any] = {"run_name": cfg["run_name"],
                           "structure": structure_metrics(sae)}
    if cfg.get("dataset_path") == SYNTHETIC_DATASET or cfg.get("cross_layer"):
        reason = ("a synthetic run has no model to read text with"
                  if cfg.get("dataset_path") == SYNTHETIC_DATASET
                  else "a CLT's latents span layers; probing reads one hook point's SAE")
        out |= {"probing": {"skipped": reason}, "absorption": {"skipped": reason}}
    else:
        model = get_model(cfg["model_name"], device, cfg.get("model_dtype", "float32"))
        examples, label_names = probe_examples(dataset, label_columns, text_column)
        out["probing"] = probing(model, sae, examples, label_names,
                                 min(PROBE_TOKENS, cfg["seq_len"]), cfg["model_batch_size"],
                                 device)
        out["absorption"] = absorption(model, cfg["model_name"])
    out["seconds"] = time.perf_counter() - began
    return out
