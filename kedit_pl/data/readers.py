"""Readers: each benchmark file format -> a list of EditRequest. One function per format."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from kedit_pl.config import missing_data
from kedit_pl.data.requests import EditRequest, normalize_target
from kedit_pl.errors import ConfigError, InvalidRecord

Reader = Callable[[list[dict]], Iterable[EditRequest]]


def _template(case_id: Any, text: str, subject: str, field: str) -> str:
    """Turn a prompt with the subject filled in into a template with `{}`."""
    if subject not in text:
        raise InvalidRecord(f"record case_id={case_id}: field '{field}' does not contain the subject {subject!r}: {text!r}")
    return text.replace(subject, "{}", 1)


def _portability(value: Any) -> tuple[tuple[str, str], ...]:
    """EasyEdit's `portability` ({"New Question", "New Answer"}, or a list of them) as (question, answer) pairs."""
    items = value if isinstance(value, list) else [value] if value else []
    return tuple((str(p["New Question"]), normalize_target(str(p["New Answer"]))) for p in items)


def counterfact_rome(rows: list[dict]) -> Iterable[EditRequest]:
    """ROME's CounterFact format (`requested_rewrite`, `paraphrase_prompts`, `neighborhood_prompts`), with the
    probes of `generation_prompts` and of EasyEdit's CounterFact-plus files where a record has them."""
    for r in rows:
        rw = r["requested_rewrite"]
        for key in ("paraphrase_prompts", "neighborhood_prompts"):  # PS, NS and Score need them on every record
            if not r.get(key) or not isinstance(r[key], list):
                raise InvalidRecord(f"record case_id={r.get('case_id')}: field {key!r} is missing or empty (every "
                                    f"CounterFact record has some; {'PS' if key[0] == 'p' else 'NS'} and Score need them)")
        yield EditRequest(
            case_id=str(r["case_id"]), subject=rw["subject"], prompt=rw["prompt"],
            target_true=normalize_target(rw["target_true"]["str"]), target_new=normalize_target(rw["target_new"]["str"]),
            paraphrases=tuple(r["paraphrase_prompts"]), neighborhood=tuple(r["neighborhood_prompts"]),
            relation_id=rw.get("relation_id"), generation_prompts=tuple(r.get("generation_prompts") or ()),
            portability=_portability(r.get("portability")),
            distracting_neighborhood=tuple(r.get("distracting_neighborhood_prompts") or ()),
            alternative_subject=(r.get("alternative_subject") or "").strip() or None)


def counterfact_easyedit(rows: list[dict]) -> Iterable[EditRequest]:
    """EasyEdit's CounterFact split format (`prompt` with the subject filled in, one rephrase, one locality)."""
    for r in rows:
        cid = r["case_id"]
        yield EditRequest(
            case_id=str(cid), subject=r["subject"], prompt=_template(cid, r["prompt"], r["subject"], "prompt"),
            target_true=normalize_target(r["ground_truth"]), target_new=normalize_target(r["target_new"]),
            paraphrases=(r["rephrase_prompt"],) if r.get("rephrase_prompt") else (),
            neighborhood=(r["locality_prompt"],) if r.get("locality_prompt") else (),
            loc=r.get("locality_prompt"), loc_ans=r.get("locality_ground_truth"))


def zsre_mend(rows: list[dict]) -> Iterable[EditRequest]:
    """MEND's zsRE format: `src` question, `alt` = edit target, `answers[0]` = true answer, `loc`/`loc_ans`.

    (Beware the raw MzsRE train json, where `alt` is the TRUE answer; read the derived/normalized file.)
    """
    for r in rows:
        cid = r["case_id"]
        answers = r.get("answers") or [""]
        yield EditRequest(
            case_id=str(cid), subject=r["subject"], prompt=_template(cid, r["src"], r["subject"], "src"),
            target_true=normalize_target(answers[0]), target_new=normalize_target(r["alt"]),
            paraphrases=(r["rephrase"],) if r.get("rephrase") else (),
            loc=r.get("loc"), loc_ans=normalize_target(r.get("loc_ans", "")) or None)


READERS: dict[str, Reader] = {
    "counterfact": counterfact_rome,
    "counterfact_easyedit": counterfact_easyedit,
    "zsre": zsre_mend,
}


def read_json_records(path: str | Path) -> list[dict]:
    """The list of records in a JSON file; a missing or malformed file is a one-line `ConfigError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing_data("dataset.path", path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"dataset.path: {path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ConfigError(f"dataset.path: {path} must hold a JSON list of records")
    return data


def merge_probes(requests: list[EditRequest], fmt: str, paths: Iterable[str | Path]) -> list[EditRequest]:
    """Fill each request's empty probe fields (`EditRequest.PROBE_FIELDS`) from the record of the same case_id
    in other files, e.g. `alternative_subject` from CounterFact-plus's subject-replace file. Records of those
    files that are not in `requests` are ignored; a record whose edit differs is an error."""
    from dataclasses import replace

    by_id = {r.case_id: r for r in requests}
    for path in paths:
        for other, _ in read_requests(fmt, path):
            mine = by_id.get(other.case_id) if other else None
            if mine is None:
                continue
            if (mine.subject, mine.prompt, mine.target_new) != (other.subject, other.prompt, other.target_new):
                raise ConfigError(f"dataset.merge: case_id {mine.case_id} in {path} edits a different fact than the "
                                  f"main file ({other.subject!r} -> {other.target_new!r})")
            fill = {f: getattr(other, f) for f in EditRequest.PROBE_FIELDS if not getattr(mine, f) and getattr(other, f)}
            if fill:
                by_id[mine.case_id] = replace(mine, **fill)
    return [by_id[r.case_id] for r in requests]


def read_requests(fmt: str, path: str | Path) -> list[tuple[EditRequest | None, InvalidRecord | None]]:
    """Parse every record; a malformed one yields (None, error) so the caller decides to fail or skip."""
    if fmt not in READERS:
        raise ConfigError(f"dataset.format: unknown format {fmt!r}; choose one of {sorted(READERS)}")
    out: list[tuple[EditRequest | None, InvalidRecord | None]] = []
    for i, row in enumerate(read_json_records(path)):
        if isinstance(row, dict) and "case_id" not in row:
            row = {"case_id": i, **row}  # formats without ids (zsRE) are numbered by position
        try:
            (req,) = list(READERS[fmt]([row]))
            out.append((req.validate(), None))
        except InvalidRecord as e:
            e.case_id = str(row.get("case_id", i) if isinstance(row, dict) else i)
            out.append((None, e))
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            cid = row.get("case_id", i) if isinstance(row, dict) else i
            err = InvalidRecord(f"record case_id={cid}: missing or malformed field {e} for format {fmt!r}")
            err.case_id = str(cid)
            out.append((None, err))
    return out
