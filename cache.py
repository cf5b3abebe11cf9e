"""The disk cache of an activation stream (`cache_dir`): the first run writes it, later runs with
the same data settings read it instead of running the model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from config import CACHE_KEYS, TORCH_DTYPES
from files import WRITE_ERRORS, write_failure


class CacheWriteError(RuntimeError):
    """Writing the activation cache failed (disk full, I/O error); shards it lists are intact."""


CACHE_SHARD_TOKENS = 65536


class ActivationCache:
    """Append-only copy, on disk, of one hook point's activation stream: the held-out
    set and the training stream in order, in safetensors shards. A shard is written to a
    temporary name and renamed, then listed in manifest.json (also replaced atomically)
    with the stream position after it, so a crash never lists a partial shard and a run
    that needs more than is cached knows where to resume generating."""

    def __init__(self, root: str | Path, cfg: dict[str, Any], hook_point: str,
                 shard: tuple[int, int] = (0, 1)):
        identity = {k: cfg[k] for k in CACHE_KEYS} | {"hook_point": hook_point}
        if shard[1] > 1:
            identity["shard"] = list(shard)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(root) / f"{hook_point}-{digest}"
        self.dtype = TORCH_DTYPES[cfg["cache_dtype"]]
        self.manifest_path = self.folder / "manifest.json"
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text())
        else:
            self.manifest = {"identity": identity, "eval": None, "shards": []}
        self._pending: list[Tensor] = []
        self._loaded: tuple[int, Tensor] | None = None

    @property
    def tokens(self) -> int:
        """Training-stream tokens cached."""
        return self.manifest["shards"][-1]["end"] if self.manifest["shards"] else 0

    def round_trip(self, acts: Tensor) -> Tensor:
        """What a later run will read back: the values in the cache dtype, as float32."""
        return acts.to(self.dtype).float()

    def _write(self, name: str, tensor: Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._writing(self.folder / f".tmp-{name}") as tmp:
            save_file({"acts": tensor.to(self.dtype).contiguous().cpu()}, tmp)
            os.replace(tmp, self.folder / name)

    def _save_manifest(self) -> None:
        with self._writing(self.folder / ".tmp-manifest.json") as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1))
            os.replace(tmp, self.manifest_path)

    @contextlib.contextmanager
    def _writing(self, tmp: Path) -> Iterator[Path]:
        """Write via the temp file `tmp`; a failed write removes it and raises CacheWriteError."""
        try:
            yield tmp
        except WRITE_ERRORS as err:
            what = write_failure(err, self.folder)
            tmp.unlink(missing_ok=True)
            raise CacheWriteError(f"{what} while writing the activation cache {tmp.parent}; "
                                  f"the shards it lists are intact, and runs read them and "
                                  f"generate the rest: free space or choose another cache_dir "
                                  f"(an interrupted run continues with --resume)") from None

    def read_eval(self) -> Tensor | None:
        return (load_file(self.folder / self.manifest["eval"])["acts"].float()
                if self.manifest["eval"] else None)

    def write_eval(self, acts: Tensor) -> None:
        self._write("eval.safetensors", acts)
        self.manifest["eval"] = "eval.safetensors"
        self._save_manifest()

    def read(self, start: int, stop: int) -> Tensor:
        """Cached stream tokens [start, min(stop, end of start's shard)) as float32."""
        for i, shard in enumerate(self.manifest["shards"]):
            if shard["start"] <= start < shard["end"]:
                if self._loaded is None or self._loaded[0] != i:
                    self._loaded = (i, load_file(self.folder / shard["file"])["acts"])
                data = self._loaded[1]
                return data[start - shard["start"]:min(stop, shard["end"]) - shard["start"]].float()
        raise IndexError(f"token {start} is not in the cache {self.folder}")

    def position_after(self, end: int) -> dict[str, int]:
        """Stream position (rows_read, epoch) recorded where a shard ends at `end`."""
        shard = next(s for s in self.manifest["shards"] if s["end"] == end)
        return {"rows_read": shard["rows_read"], "epoch": shard["epoch"]}

    @property
    def end(self) -> int:
        """Stream tokens written or waiting to fill a shard: where the next chunk appends."""
        return self.tokens + sum(p.shape[0] for p in self._pending)

    def append(self, acts: Tensor, rows_read: int, epoch: int) -> None:
        """Add the next chunk of the stream, read up to stream position (rows_read, epoch);
        whole shards go to disk as they fill."""
        self._pending.append(acts)
        self._pending_position = {"rows_read": rows_read, "epoch": epoch}
        if self.end - self.tokens >= CACHE_SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        """Write the pending chunks as one shard (also when the run ends with a partial one)."""
        if not self._pending:
            return
        data = torch.cat(self._pending)
        self._pending = []
        name = f"shard_{len(self.manifest['shards']):05d}.safetensors"
        self._write(name, data)
        start = self.tokens
        self.manifest["shards"].append({"file": name, "start": start, "end": start + data.shape[0]}
                                       | self._pending_position)
        self._save_manifest()
