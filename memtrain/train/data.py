"""Token streams for training: local text or JSON-lines files, the Python standard library's
own sources, or generated tokens. Byte-level, so no tokenizer has to be downloaded.

A stream is resumable: its whole state is ``position`` (the index of the next batch), so a
checkpoint that stores it continues with exactly the batches an uninterrupted run would see.
With several processes, rank ``r`` of ``world_size`` reads global batches ``r, r + world_size,
...`` (rank-strided): every rank sees different data, and together they see the batches one
process would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from memtrain.errors import ConfigError

BYTE_VOCAB = 256


def _files(paths: str | list[str]) -> list[Path]:
    items = [paths] if isinstance(paths, str) else list(paths)
    found: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"data.path {item!r}: no such file or folder")
    if not found:
        raise ConfigError(f"data.path {paths!r} holds no files")
    return found


def _stdlib_files() -> list[Path]:
    root = Path(os.__file__).parent
    return sorted(p for p in root.glob("*.py"))


def _read_corpus(source: str, path: Any, text_field: str, limit_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    files = _stdlib_files() if source == "stdlib" else _files(path)
    for file in files:
        try:
            content = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"data.path {str(file)!r}: cannot read ({exc.strerror})") from None
        if source == "jsonl":
            text = content.decode(errors="replace")
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"{file}:{number}: not a JSON line") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ConfigError(f"{file}:{number}: no {text_field!r} field")
                chunks.append(str(record[text_field]).encode() + b"\n")
                total += len(chunks[-1])
        else:
            chunks.append(content)
            total += len(chunks[-1])
        if total >= limit_bytes:
            break
    return b"".join(chunks)[:limit_bytes]


class TokenStream:
    """Batches of ``(batch, seq)`` token ids, deterministic in ``(seed, position)``."""

    def __init__(
        self,
        source: str,
        seq: int,
        batch: int,
        vocab_size: int,
        path: Any = None,
        text_field: str = "text",
        seed: int = 0,
        max_corpus_bytes: int = 64 * 2**20,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside a world of {world_size} processes")
        self.source, self.seq, self.batch, self.seed = source, seq, batch, seed
        self.rank, self.world_size = rank, world_size
        self.vocab_size = vocab_size
        self.position = 0
        self._corpus: torch.Tensor | None = None
        if source != "generated":
            if vocab_size < BYTE_VOCAB:
                raise ConfigError(
                    f"text data is byte-level and needs a vocabulary of at least {BYTE_VOCAB}; "
                    f"the model has {vocab_size}"
                )
            data = _read_corpus(source, path, text_field, max_corpus_bytes)
            if len(data) < seq + 1:
                raise ConfigError(
                    f"the corpus has {len(data)} bytes, fewer than one sequence of {seq + 1}"
                )
            self._corpus = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def batch_at(self, position: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        if self._corpus is None:
            return torch.randint(0, self.vocab_size, (self.batch, self.seq), generator=generator)
        span = self._corpus.numel() - self.seq
        starts = torch.randint(0, span, (self.batch,), generator=generator)
        return torch.stack([self._corpus[s : s + self.seq] for s in starts.tolist()])

    def __next__(self) -> torch.Tensor:
        ids = self.batch_at(self.position * self.world_size + self.rank)
        self.position += 1
        return ids

    def __iter__(self):
        return self

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ConfigError("the checkpoint was written with another data.seed")
        position, world = int(state["position"]), int(state.get("world_size", 1))
        if world != self.world_size:
            # Another number of processes: skip past every batch the old world consumed.
            position = -(-position * world // self.world_size)
        self.position = position
