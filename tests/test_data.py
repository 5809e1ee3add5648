"""Record reading, validation and selection."""
import json

import pytest

from tests.conftest import DATA_DIR
from kedit_pl.data.datamodule import load_split, select
from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, InvalidRecord

DATA = DATA_DIR
CF = DATA / "counterfact" / "derived" / "counterfact_rome_format_union.json"


def cf_row(case_id=1, subject="Danielle Darrieux", prompt="The mother tongue of {} is", new="English", true="French"):
    return {"case_id": case_id, "requested_rewrite": {"prompt": prompt, "subject": subject, "relation_id": "P103",
            "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"]}


def write(tmp_path, rows):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows))
    return p


def test_reads_real_counterfact():
    reqs = load_split(CF, "counterfact")
    assert len(reqs) > 3000
    r = reqs[0]
    assert r.rewrite == "The mother tongue of Danielle Darrieux is" and r.target_new == "English"
    assert r.target_true == "French" and len(r.paraphrases) == 2 and len(r.neighborhood) >= 5


def test_reads_real_zsre_with_alt_as_target():
    reqs = load_split(DATA / "zsre/mend_format/zsre_mend_eval_portability_gpt4.json", "zsre", on_invalid="skip")
    r = reqs[0]
    assert "{}" in r.prompt and r.loc.startswith("nq question") and r.loc_ans
    raw = json.loads((DATA / "zsre/mend_format/zsre_mend_eval_portability_gpt4.json").read_text())[0]
    assert r.target_new == raw["alt"] and r.target_true == raw["answers"][0]
    assert len({q.case_id for q in reqs}) == len(reqs), "zsRE records (no ids in the file) get unique positional ids"


@pytest.mark.parametrize("row, field", [
    (cf_row(prompt="The mother tongue is"), "prompt"),
    (cf_row(new=""), "target_new"),
    (cf_row(true="  "), "target_true"),
    (cf_row(new="French"), "target_new"),
    (cf_row(prompt="Speaking of {}"), "prompt"),
    (cf_row(subject=""), "subject"),
])
def test_invalid_record_names_case_and_field(tmp_path, row, field):
    with pytest.raises(InvalidRecord, match=rf"case_id=1.*'{field}'"):
        load_split(write(tmp_path, [row]), "counterfact")


def test_skip_is_explicit_and_logged(tmp_path, caplog):
    p = write(tmp_path, [cf_row(case_id=1), cf_row(case_id=2, new="")])
    with pytest.raises(InvalidRecord):
        load_split(p, "counterfact")
    reqs = load_split(p, "counterfact", on_invalid="skip")
    assert [r.case_id for r in reqs] == ["1"]
    assert "case_id=2" in caplog.text


def test_malformed_record_and_missing_file(tmp_path):
    with pytest.raises(InvalidRecord, match="case_id=7"):
        load_split(write(tmp_path, [{"case_id": 7}]), "counterfact")
    with pytest.raises(ConfigError, match="dataset.path"):
        load_split(tmp_path / "nope.json", "counterfact")
    with pytest.raises(ConfigError, match="dataset.format"):
        load_split(write(tmp_path, []), "nope")


def test_zsre_subject_missing_from_question(tmp_path):
    row = {"subject": "X", "src": "Who is Y?", "alt": "a", "answers": ["b"], "rephrase": "r", "loc": "l", "loc_ans": "m"}
    with pytest.raises(InvalidRecord, match="'src'"):
        load_split(write(tmp_path, [row]), "zsre")


def test_selection():
    reqs = [EditRequest(str(i), "s", "{} is", "a", "b") for i in range(10)]
    assert [r.case_id for r in select(reqs, limit=3)] == ["0", "1", "2"]
    assert [r.case_id for r in select(reqs, range_="4:7")] == ["4", "5", "6"]
    assert [r.case_id for r in select(reqs, ids=[9, 2])] == ["9", "2"]
    assert [r.case_id for r in select(reqs, limit=2, exclude_ids={"0"})] == ["1"]  # resume: limit, then skip done
    with pytest.raises(ConfigError, match="dataset.ids"):
        select(reqs, ids=[42])
    with pytest.raises(ConfigError, match="dataset.range"):
        select(reqs, range_="x")


def test_training_split_never_holds_an_evaluation_fact(tmp_path):
    from kedit_pl.config import compose
    from kedit_pl.data.datamodule import EditDataModule, fact_key, load_split

    cfg = compose("train", ["dataset=counterfact", f"paths.output_dir={tmp_path}"])
    dm = EditDataModule(cfg.dataset)
    dm.prepare_training()
    held_out = {fact_key(r) for r in load_split(cfg.dataset.path, cfg.dataset.format, "skip")}
    train = dm.train_requests + dm.val_requests
    assert train and not any(fact_key(r) in held_out for r in train)
    cfg.dataset.train.exclude_eval = False
    leaky = EditDataModule(cfg.dataset)
    leaky.prepare_training()
    assert any(fact_key(r) in held_out for r in leaky.train_requests + leaky.val_requests)  # the overlap is real


def test_skipped_training_records_are_one_line_and_a_file(tmp_path, caplog):
    """zsRE's training split has records without an edit target: train.py says so once, with a count, and lists
    them in the run folder (it used to log one warning line per record)."""
    import logging

    from kedit_pl.data.datamodule import SKIPPED_TRAIN, EditDataModule

    rows = [cf_row(i, subject=f"S{i}", new="" if i % 3 == 0 else "English") for i in range(9)]  # 3 invalid
    train = write(tmp_path, rows)
    cfg = {"name": "t", "path": str(train), "format": "counterfact",
           "train": {"path": str(train), "format": "counterfact", "on_invalid": "skip", "exclude_eval": False}}
    dm = EditDataModule(cfg)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="kedit_pl.data.datamodule"):
        dm.prepare_training(run)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "skipped 3 invalid records of 9" in lines[0] and str(run / SKIPPED_TRAIN) in lines[0]
    listed = json.loads((run / SKIPPED_TRAIN).read_text())
    assert [r["case_id"] for r in listed] == ["0", "3", "6"] and all("invalid record" in r["reason"] for r in listed)
    assert len(dm.train_requests) + len(dm.val_requests) == 6
