"""Dev/test splits: disjoint, deterministic, big enough, and limit/range act within them."""
import json

import pytest

from tests.conftest import DATA_DIR
from kedit_pl.data.datamodule import EditDataModule, load_split
from kedit_pl.data.splits import apply_split, ids_digest
from kedit_pl.errors import ConfigError

CF = DATA_DIR / "counterfact" / "derived" / "counterfact_rome_format_union.json"
CF_PLUS = DATA_DIR / "counterfact" / "original_format" / "counterfact_portability_gpt4.json"
ZSRE = DATA_DIR / "zsre" / "mend_format" / "zsre_mend_eval_portability_gpt4.json"


def _split_ids(reqs, split, rule):
    return [r.case_id for r in apply_split(reqs, split, rule)]


@pytest.mark.parametrize("path,fmt,rule,on_invalid", [(CF, "counterfact", "counterfact", "error"),
                                                      (CF_PLUS, "counterfact", "counterfact", "error"),
                                                      (ZSRE, "zsre", "zsre", "skip")])
def test_splits_are_disjoint_deterministic_and_cover_the_file(path, fmt, rule, on_invalid):
    reqs = load_split(path, fmt, on_invalid)
    dev, test = _split_ids(reqs, "dev", rule), _split_ids(reqs, "test", rule)
    assert not set(dev) & set(test)
    assert sorted(dev + test, key=int) == sorted((r.case_id for r in reqs), key=int)
    assert _split_ids(list(reversed(reqs)), "test", rule) == list(reversed(test))  # membership, not position
    assert _split_ids(reqs, "all", rule) == [r.case_id for r in reqs]


def test_test_split_sizes_and_what_dev_holds():
    cf = load_split(CF, "counterfact")
    assert len(_split_ids(cf, "test", "counterfact")) >= 1000
    assert _split_ids(cf, "dev", "counterfact")[:200] == [r.case_id for r in cf[:200]]  # the tables' first 200
    plus = apply_split(load_split(CF_PLUS, "counterfact"), "test", "counterfact")
    assert sum(bool(r.generation_prompts) and bool(r.portability) for r in plus) >= 500
    raw_plus = [str(r["case_id"]) for r in json.loads(CF_PLUS.read_text())[:200]]
    assert not set(raw_plus) & {r.case_id for r in plus}  # the head to head's records are dev
    zsre = load_split(ZSRE, "zsre", on_invalid="skip")
    assert len(_split_ids(zsre, "test", "zsre")) >= 400
    assert all(int(i) >= 200 for i in _split_ids(zsre, "test", "zsre"))


def test_limit_and_range_apply_within_the_split_and_the_digest_is_recorded():
    cfg = {"path": str(CF), "format": "counterfact", "limit": 5, "split": "test", "split_rule": "counterfact"}
    dm = EditDataModule(cfg)
    first = [r.case_id for r in dm.prepare_requests()]
    assert first == _split_ids(load_split(CF, "counterfact"), "test", "counterfact")[:5]
    assert dm.selection == {"split": "test", "split_rule": "counterfact", "n_selected": 5,
                            "records_sha256": ids_digest(first)}
    dm2 = EditDataModule(cfg | {"limit": None, "range": "2:4"})
    assert [r.case_id for r in dm2.prepare_requests()] == first[2:4]


def test_digest_is_of_the_sorted_ids():
    assert ids_digest(["10", "2", "1"]) == ids_digest(["1", "2", "10", "2"]) != ids_digest(["1", "2"])


def test_bad_split_settings_are_one_line_errors():
    reqs = load_split(CF, "counterfact")[:3]
    with pytest.raises(ConfigError, match="dataset.split: must be one of"):
        apply_split(reqs, "validation", "counterfact")
    with pytest.raises(ConfigError, match="dataset.split_rule"):
        apply_split(reqs, "test", None)
    from kedit_pl.data.requests import EditRequest

    odd = [EditRequest("abc", "S", "{} is", "a", "b")]
    with pytest.raises(ConfigError, match="not a number"):
        apply_split(odd, "dev", "counterfact")


def test_config_validation_names_the_bad_split():
    from kedit_pl.config import compose
    from kedit_pl.validate import validate_edit_config

    with pytest.raises(ConfigError, match="dataset.split: must be one of"):
        validate_edit_config(compose("edit", ["dataset.split=validation", "paths.output_dir=/dev/null"]))
    with pytest.raises(ConfigError, match="split_rule"):
        validate_edit_config(compose("edit", ["dataset.split=test", "dataset.split_rule=null",
                                              "paths.output_dir=/dev/null"]))
    validate_edit_config(compose("edit", ["dataset.split=test", "paths.output_dir=/dev/null"]))
    sweep = compose("edit", ["hparams_search=rome_optuna", "paths.output_dir=/dev/null"])
    assert sweep.dataset.split == "dev"
    assert compose("edit", ["experiment=head_to_head", "paths.output_dir=/dev/null"]).dataset.split == "test"


def test_a_resumed_run_must_keep_its_split():
    from kedit_pl.config import compose
    from kedit_pl.run_folder import first_difference, run_identity

    ident = lambda *o: run_identity(compose("edit", [*o, "paths.output_dir=/dev/null"]), 1)  # noqa: E731
    assert "split" not in ident()["dataset"]  # folders written before splits existed stay resumable
    diff = first_difference(ident("dataset.split=dev"), ident("dataset.split=test"))
    assert diff == "dataset.split: 'dev' in the folder, 'test' now"


def test_an_id_of_the_other_split_is_named():
    dm = EditDataModule({"path": str(CF), "format": "counterfact", "ids": ["0"], "split": "test",
                         "split_rule": "counterfact"})
    with pytest.raises(ConfigError, match=r"case_id 0 not in the dataset \(within dataset.split=test: 3491 of"):
        dm.prepare_requests()
