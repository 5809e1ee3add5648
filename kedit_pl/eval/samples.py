"""Generations people can read: before/after greedy continuations of the rewrite prompt and one neighborhood
prompt for the first k records, as `samples.md` in the run folder and a W&B Table (`eval.samples`)."""
from __future__ import annotations

from pathlib import Path

from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.generate import greedy_generate, greedy_generate_states
from kedit_pl.eval.row_states import EditedSystem
from kedit_pl.io import write_text

COLUMNS = ["case_id", "prompt_kind", "prompt", "target_true", "target_new", "before", "after"]


def sample_prompts(req: EditRequest) -> dict[str, str]:
    """The prompts generated from for a record's samples: its rewrite and its first neighbourhood prompt."""
    out = {"rewrite": req.rewrite}
    if req.neighborhood:
        out["neighborhood"] = req.neighborhood[0]
    return out


def generate_samples(method, requests: list[EditRequest], max_new_tokens: int = 40) -> list[dict]:
    """Per request: {"targets": [true, new], <prompt kind>: {"prompt", "text"}} under the current model."""
    keyed = [(i, kind, p) for i, r in enumerate(requests) for kind, p in sample_prompts(r).items()]
    texts = greedy_generate(method, [p for *_, p in keyed], max_new_tokens) if keyed else []
    by_request: list[list[str]] = [[] for _ in requests]
    for (i, *_), t in zip(keyed, texts):
        by_request[i].append(t)
    return [_sample(r, ts) for r, ts in zip(requests, by_request)]


def generate_samples_states(method, requests: list[EditRequest], systems: list[EditedSystem],
                            max_new_tokens: int = 40) -> list[dict]:
    """`generate_samples` of each request on its own edited system (`eval/row_states.py`), in shared batches,
    with every edit undone (the system must route the request's `sample_prompts`)."""
    texts = greedy_generate_states(method, [list(sample_prompts(r).values()) for r in requests], systems,
                                   max_new_tokens)
    return [_sample(r, ts) for r, ts in zip(requests, texts)]


def _sample(req: EditRequest, texts: list[str]) -> dict:
    """One request's samples from its continuations of `sample_prompts(req)`, in that order."""
    out: dict = {"targets": [req.target_true, req.target_new]}
    for (kind, p), t in zip(sample_prompts(req).items(), texts):
        out[kind] = {"prompt": p, "text": t}
    return out


def sample_rows(done: list[dict]) -> list[list[str]]:
    """Table rows (COLUMNS) of the records that carry samples before and after."""
    rows = []
    for d in done:
        pre, post = d["pre"].get("samples"), d["post"].get("samples")
        if not pre or not post:
            continue
        true, new = pre["targets"]
        for kind in ("rewrite", "neighborhood"):
            if kind in pre and kind in post:
                rows.append([d["case_id"], kind, pre[kind]["prompt"], true, new, pre[kind]["text"], post[kind]["text"]])
    return rows


def samples_markdown(rows: list[list[str]], title: str = "") -> str:
    """The before/after generations of the sampled records as Markdown."""
    lines = [f"# Generations before and after editing{' · ' + title if title else ''}", ""]
    for case_id, kind, prompt, true, new, before, after in rows:
        lines += [f"## case {case_id} · {kind} prompt · {true} → {new}", "", f"**Prompt:** {prompt}", "",
                  f"- **before:** {prompt} **{_md(before)}**", f"- **after:** {prompt} **{_md(after)}**", ""]
    return "\n".join(lines)


def _md(text: str) -> str:
    return " ".join(text.split()).replace("*", r"\*")


def write_samples(out_dir: Path, rows: list[list[str]], loggers: list, title: str = "") -> Path | None:
    """Write `samples.md` and log the table to the loggers that take tables; None if there are no rows."""
    if not rows:
        return None
    path = Path(out_dir) / "samples.md"
    write_text(path, samples_markdown(rows, title))
    for lg in loggers:
        if hasattr(lg, "log_table"):
            lg.log_table(key="samples", columns=COLUMNS, data=rows)
    return path
