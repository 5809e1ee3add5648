"""SERAC's explicit edit memory (Mitchell et al. 2022, §3): the stored edits z_e, never merged into weights.

Each entry is an edit's prompt with its new target. The memory also holds one scope-classifier embedding per
entry (rows of `embeddings`), so a scope lookup for a whole batch of inputs is one matrix product.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kedit_pl.errors import ConfigError
from kedit_pl.io import read_json, write_json

FORMAT = "kedit_pl.serac.memory/1"


@dataclass(frozen=True)
class MemoryEntry:
    """One stored edit: `prompt` (the edit input, subject filled in) should now be answered with `target`."""

    id: int
    case_id: str
    prompt: str
    target: str


class EditMemory:
    """Ordered store of edits plus their (L2-normalized) classifier embeddings, row i <-> entries[i]."""

    def __init__(self) -> None:
        self.entries: list[MemoryEntry] = []
        self.embeddings: torch.Tensor | None = None
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, items: list[tuple[str, str, str]], embeddings: torch.Tensor) -> list[int]:
        """Append (case_id, prompt, target) items with their embeddings; return the new entries' ids."""
        if len(items) != embeddings.shape[0]:
            raise ValueError(f"{len(items)} memory items but {embeddings.shape[0]} embeddings")
        ids = list(range(self._next_id, self._next_id + len(items)))
        self._next_id += len(items)
        self.entries += [MemoryEntry(i, str(c), p, t) for i, (c, p, t) in zip(ids, items)]
        emb = embeddings.detach()
        self.embeddings = emb if self.embeddings is None else torch.cat([self.embeddings, emb.to(self.embeddings)])
        return ids

    def remove(self, ids: list[int]) -> None:
        """Drop the entries with these ids (the restore of SERAC's edits)."""
        drop = set(ids)
        keep = [j for j, e in enumerate(self.entries) if e.id not in drop]
        self.entries = [self.entries[j] for j in keep]
        if self.embeddings is not None:
            self.embeddings = self.embeddings[keep] if keep else None

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity to, and row index of, each query's most similar entry (one matmul, B x N)."""
        if self.embeddings is None:
            raise ValueError("the edit memory is empty")
        sims = queries @ self.embeddings.to(queries).T
        return sims.max(dim=-1)

    def save(self, path: str | Path) -> Path:
        """Write the entries as JSON, atomically (embeddings are recomputed on load by the classifier)."""
        write_json(path, {"format": FORMAT, "next_id": self._next_id, "entries": [asdict(e) for e in self.entries]})
        return Path(path)

    @staticmethod
    def read(path: str | Path) -> tuple[list[MemoryEntry], int]:
        """The entries and next id stored at `path` (ConfigError naming the file if it is not a memory)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"method.memory_load: no SERAC memory file at {path}")
        try:
            data = read_json(path)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            entries = [MemoryEntry(int(e["id"]), str(e["case_id"]), e["prompt"], e["target"]) for e in data["entries"]]
            return entries, int(data["next_id"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"method.memory_load: {path} is not a SERAC memory file ({e})") from None

    def restore_entries(self, entries: list[MemoryEntry], next_id: int, embeddings: torch.Tensor) -> None:
        """Replace the memory with saved entries (keeping their ids) and their fresh embeddings."""
        self.entries = list(entries)
        self.embeddings = embeddings.detach() if entries else None
        self._next_id = max([next_id] + [e.id + 1 for e in entries])
