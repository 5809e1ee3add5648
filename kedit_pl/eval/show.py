"""`edit.show=k`: the first k records' generations before and after the edit, as a rich table."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.generate import greedy_generate


class EditShow:
    """Generates the rewrite prompt and the first neighborhood prompt of the first `k` records, unedited (`before`)
    and right after their edit (`after`, called by the eval callback before it restores)."""

    def __init__(self, k: int, max_new_tokens: int = 10) -> None:
        self.k, self.n = int(k), int(max_new_tokens)
        self.rows: dict[str, dict[str, Any]] = {}

    def _prompts(self, req: EditRequest) -> list[tuple[str, str]]:
        out = [("rewrite", req.rewrite)]
        if req.neighborhood:
            out.append(("neighborhood", req.neighborhood[0]))
        return out

    def before(self, method, requests: list[EditRequest]) -> None:
        """Generate from the first k records' prompts on the unedited model."""
        for req in requests[: self.k]:
            self.rows[req.case_id] = {"req": req, "gen": {
                kind: [p, greedy_generate(method, [p], self.n, stop_at_eos=True)[0], None]
                for kind, p in self._prompts(req)}}

    def __call__(self, method, handle, batch: list[EditRequest], batch_idx: int) -> None:
        for req in batch:
            row = self.rows.get(req.case_id)
            if row is not None:
                for kind, entry in row["gen"].items():
                    entry[2] = greedy_generate(method, [entry[0]], self.n, stop_at_eos=True)[0]

    def print(self, console: Console | None = None) -> None:
        """Print the before/after generations as a table."""
        if not self.rows:
            return
        table = Table(title=f"edit.show: first {len(self.rows)} record(s), greedy generations", show_lines=True)
        for col in ("case", "edit", "prompt", "before", "after"):
            table.add_column(col, overflow="fold")
        for cid, row in self.rows.items():
            req = row["req"]
            for kind, (prompt, before, after) in row["gen"].items():
                edit = f"{req.target_true} → {req.target_new}" if kind == "rewrite" else "(neighbour)"
                table.add_row(str(cid), edit, prompt, before, after if after is not None else "(not edited)")
        (console or Console()).print(table)
