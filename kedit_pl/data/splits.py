"""Named, disjoint, deterministic dev/test splits of the shipped benchmarks (docs/data.md).

`dataset.split=dev|test|all` picks the split *before* `dataset.limit` / `range` / `ids`, so those act within it.
A dataset config names its rule with `dataset.split_rule` (counterfact | zsre; null: the file has no split).

- dev holds every record used so far to choose a default or a hyperparameter; test holds the rest.
- CounterFact (any file with CounterFact's global case_ids: the union file, CounterFact-plus, EasyEdit's splits):
  dev = case_id < 1000 (the first 200 records of counterfact_rome_format_union.json: the ROME layer sweep, the
  FT-L bound, Gemma's clamp, the Optuna sweeps, the KN/MEND/KE tables) plus the 130 case_ids >= 1000 among the first
  200 records of counterfact_portability_gpt4.json (the head to head).
- zsRE (the MEND-format eval file, whose records are numbered by position): dev = case_id < 200 (the MEND / KE /
  SERAC tables and experiment=mend_zsre's evaluation).
- Learned editors validate on records of their training files, which share no fact with the evaluation files
  (`dataset.train.exclude_eval`): that validation is dev by construction and never touches test.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Sequence

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError

SPLITS = ("all", "dev", "test")

#: CounterFact case_ids >= 1000 that the head to head ran on (the first 200 CounterFact-plus records)
COUNTERFACT_HEAD_TO_HEAD = frozenset((
    4482, 4484, 4488, 4496, 4498, 4504, 4509, 4510, 4516, 4517, 4519, 4520, 4527, 4554, 4556, 4574, 4575, 4576,
    4578, 4581, 4583, 4601, 4612, 4620, 4626, 4629, 4638, 4640, 4647, 4650, 4653, 4657, 4664, 4676, 4688, 4699,
    4713, 4729, 4731, 4732, 4737, 4741, 4778, 4781, 4798, 4799, 4809, 4814, 4821, 4838, 4839, 4843, 4846, 4847,
    4863, 4868, 4869, 4872, 4899, 4903, 4905, 4913, 4927, 4935, 4939, 4941, 4944, 4946, 4949, 4951, 4955, 4958,
    4959, 4979, 4980, 4985, 4986, 4988, 4999, 5013, 5024, 5045, 5049, 5051, 5062, 5068, 5072, 5079, 5083, 5089,
    5100, 5119, 5131, 5138, 5139, 5146, 5149, 5153, 5157, 5170, 5178, 5182, 5183, 5184, 5185, 5191, 5199, 5227,
    5245, 5265, 5270, 5273, 5284, 5287, 5294, 5299, 5300, 5302, 5304, 5308, 5314, 5321, 5330, 5339, 5340, 5344,
    5364, 5382, 5384, 5387
))


def counterfact_is_dev(case_id: str) -> bool:
    """CounterFact dev: case_id < 1000, plus the records of the first head to head (docs/data.md)."""
    return int(case_id) < 1000 or int(case_id) in COUNTERFACT_HEAD_TO_HEAD


def zsre_is_dev(case_id: str) -> bool:
    """zsRE dev: case_id < 200 (docs/data.md)."""
    return int(case_id) < 200


#: split rule name -> whether a case_id is in dev (everything else is test)
RULES: dict[str, Callable[[str], bool]] = {"counterfact": counterfact_is_dev, "zsre": zsre_is_dev}


def is_dev(rule: str, case_id: str) -> bool:
    """Whether `case_id` is in the dev split under `rule` (a ConfigError names a case_id the rule cannot read)."""
    try:
        return RULES[rule](str(case_id))
    except ValueError:
        raise ConfigError(f"dataset.split_rule={rule}: case_id {case_id!r} is not a number; this file has no "
                          f"{rule} split (use dataset.split=all)") from None


def apply_split(requests: Sequence[EditRequest], split: str | None, rule: str | None) -> list[EditRequest]:
    """The records of `split` ('all', 'dev' or 'test') in file order."""
    split = split or "all"
    if split not in SPLITS:
        raise ConfigError(f"dataset.split: must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return list(requests)
    if rule not in RULES:
        raise ConfigError(f"dataset.split={split}: dataset.split_rule must be one of {sorted(RULES)}, got {rule!r} "
                          f"(a file without a split rule only has dataset.split=all)")
    want_dev = split == "dev"
    return [r for r in requests if is_dev(rule, r.case_id) == want_dev]


def _id_key(case_id: str) -> tuple:
    return (0, int(case_id), "") if case_id.isdigit() else (1, 0, case_id)


def ids_digest(case_ids: Iterable[str]) -> str:
    """sha256 of the sorted case_ids (numeric ones in numeric order, then the rest), one per line: two runs with the
    same digest were asked for the same records."""
    ids = sorted({str(i) for i in case_ids}, key=_id_key)
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
