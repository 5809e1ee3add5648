"""Saved edits: patches (low rank where the update is), exact apply/revert, digests, the CLI; the edited model
saved and reloaded in a fresh process; the Python API; edit.save / edit.show in edit runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import edit_cfg

from kedit_pl import Editor
from kedit_pl.config import REPO_ROOT
from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, InvalidRecord
from kedit_pl.patch import PatchError, apply_patch, load_patch, main as patch_cli, revert_patch
from kedit_pl.pipeline import run_edit

pytestmark = pytest.mark.usefixtures("one_thread")

FACT = dict(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
            target_true="French", neighborhood=["The mother tongue of Léon Blum is"])
FACT2 = dict(subject="Toko Yasuda", prompt="{} plays the", target_new="piano", target_true="guitar")
FAST = ["method.v_num_grad_steps=3", "method.mom2_adjustment=false"]  # no key statistics: seconds per test


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def rome():
    return Editor(method="rome", model="tiny_llama", overrides=FAST)


def test_rome_patch_is_rank_one_and_exact(rome, tmp_path: Path) -> None:
    before = state(rome.model)
    edit = rome.edit(**FACT)
    edited = state(rome.model)
    assert not same(before, edited)
    path = edit.save(tmp_path / "darrieux")
    patch = load_patch(path)
    (name,) = patch.params
    assert patch.meta["encoding"][name] == {"kind": "low_rank", "terms": 1, "rank": 1}
    assert patch.tensors[f"{name}::left0"].shape == (64, 1) and patch.tensors[f"{name}::right0"].shape == (1, 256)
    assert patch.meta["requests"][0]["subject"] == FACT["subject"] and patch.meta["method"] == "rome"
    assert patch.nbytes() < edited[name].numel() * 4  # smaller than the dense matrix
    edit.revert()
    assert same(state(rome.model), before)
    apply_patch(rome.model, patch)  # a fresh apply gives the edited weights bit-exactly
    assert same(state(rome.model), edited)
    with pytest.raises(PatchError, match="not the unedited weights") as e:
        apply_patch(rome.model, patch)  # already applied
    assert "\n" not in str(e.value)
    revert_patch(rome.model, patch)
    assert same(state(rome.model), before)
    with pytest.raises(PatchError, match="not the edited weights"):
        revert_patch(rome.model, patch)


def test_patch_for_other_weights_is_refused(rome, tmp_path: Path) -> None:
    rome.edit(**FACT).save(tmp_path / "p")
    other = Editor(method="rome", model="tiny_llama", overrides=FAST + ["model.tiny.seed=1"])
    before = state(other.model)
    with pytest.raises(PatchError, match="digest mismatch"):
        other.apply_patch(tmp_path / "p.json")
    assert same(state(other.model), before)  # left as it was


def test_sequence_applies_in_order_and_reverts_in_reverse(rome, tmp_path: Path) -> None:
    before = state(rome.model)
    e1, e2 = rome.edit(**FACT), rome.edit(**FACT2)  # both edit layer 1's down_proj
    after = state(rome.model)
    e1.save(tmp_path / "1"), e2.save(tmp_path / "2")
    with pytest.raises(PatchError):
        e1.revert()  # e2 sits on top of it
    e2.revert(), e1.revert()
    assert same(state(rome.model), before)
    with pytest.raises(PatchError):
        rome.apply_patch(tmp_path / "2.json")  # made after patch 1
    rome.apply_patch(tmp_path / "1.json"), rome.apply_patch(tmp_path / "2.json")
    assert same(state(rome.model), after)


@pytest.mark.parametrize("method,model,kind", [("memit", "tiny_llama", "low_rank"), ("rome", "tiny_gpt2", "low_rank"),
                                               ("ft", "tiny_llama", "dense")])
def test_other_methods_and_conv1d(method: str, model: str, kind: str) -> None:
    ed = Editor(method=method, model=model, overrides=FAST if method != "ft" else ["method.steps=3"])
    before = state(ed.model)
    edit = ed.edit([FACT, FACT2] if method == "memit" else FACT)
    edited = state(ed.model)
    assert {e["kind"] for e in edit.patch.meta["encoding"].values()} == {kind}
    if method == "memit":
        assert all(e["rank"] == 2 for e in edit.patch.meta["encoding"].values()) and len(edit.patch.params) == 3
    edit.revert()
    assert same(state(ed.model), before)
    apply_patch(ed.model, edit.patch)
    assert same(state(ed.model), edited)


def test_damaged_patch_is_one_line(rome, tmp_path: Path) -> None:
    rome.edit(**FACT).save(tmp_path / "p")
    st = tmp_path / "p.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(PatchError, match="unreadable patch") as e:
        load_patch(tmp_path / "p.json")
    assert "\n" not in str(e.value)


def test_editor_api(rome) -> None:
    before = rome.digest()
    pre = rome.score([FACT])
    edit = rome.edit(dict(FACT, target_true=None))  # the model's own answer
    assert edit.requests[0].target_true and edit.requests[0].target_true != "English"
    assert rome.digest() != before and isinstance(rome.generate("Danielle Darrieux", 3), str)
    assert set(pre) >= {"es", "ns", "rewrite_acc"}
    edit.revert()
    assert rome.digest() == before
    with pytest.raises(InvalidRecord, match="target_new"):
        rome.edit(subject="X Y", prompt="{} is a", target_new="cat", target_true="cat")
    assert rome.digest() == before
    with pytest.raises(ConfigError, match="not a config"):
        Editor(model="no_such_model")
    assert Editor(method="ft", model="tiny_gpt2", method__layers=[2]).method.layers == [2]


def test_saved_model_reloads_with_plain_transformers(rome, tmp_path: Path) -> None:
    """Round trip: edit -> save -> a fresh process loads it with AutoModelForCausalLM -> the same logits."""
    rome.edit(**FACT)
    rome.edit(**FACT2)
    folder = rome.save_model(tmp_path / "model")
    ids = rome.tokenizer(["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"], return_tensors="pt",
                         padding=True)
    with torch.no_grad():
        ref = rome.model(**ids).logits
    torch.save({"ids": dict(ids), "ref": ref}, tmp_path / "ref.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; d = torch.load(sys.argv[2]); "
            "m = A.from_pretrained(sys.argv[1]).eval(); out = m(**d['ids']).logits; "
            "print((out - d['ref']).abs().max().item())")
    res = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "ref.pt")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) <= 1e-5


def test_patch_cli(tmp_path: Path, capsys) -> None:
    ed = Editor(method="rome", model="tiny_llama", overrides=FAST)
    ed.edit(**FACT).save(tmp_path / "patches" / "00000_a")
    ed.edit(**FACT2).save(tmp_path / "patches" / "00001_b")
    edited = ed.digest()
    assert patch_cli(["list", str(tmp_path / "patches")]) == 0
    assert "low_rank r1" in capsys.readouterr().out
    assert patch_cli(["apply", str(tmp_path / "patches"), "--model", "tiny_llama", "--out", str(tmp_path / "m")]) == 0
    assert Editor(method="rome", model=str(tmp_path / "m"), overrides=FAST).digest() == edited
    assert patch_cli(["revert", str(tmp_path / "patches"), "--model", str(tmp_path / "m"),
                      "--out", str(tmp_path / "r")]) == 0
    assert Editor(method="rome", model=str(tmp_path / "r"), overrides=FAST).digest() == \
        Editor(method="rome", model="tiny_llama", overrides=FAST).digest()
    capsys.readouterr()
    assert patch_cli(["apply", str(tmp_path / "patches"), "--model", "tiny_gpt2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and not (tmp_path / "x").exists()


def test_edit_run_saves_patches_and_model_and_shows(tmp_path: Path, capsys) -> None:
    cfg = edit_cfg(tmp_path / "seq", "method=rome", *FAST, "edit.mode=sequential", "edit.save=model", "edit.show=1",
                   "dataset.limit=2")
    run_edit(cfg)
    assert "edit.show" in capsys.readouterr().out
    assert (tmp_path / "seq" / "model" / "config.json").is_file()
    cfg = edit_cfg(tmp_path / "one", "method=rome", *FAST, "edit.save=patch", "dataset.limit=2")
    run_edit(cfg)
    patches = sorted((tmp_path / "one" / "patches").glob("*.json"))
    assert len(patches) == 2 and json.loads(patches[0].read_text())["step"] == 0
    with pytest.raises(ConfigError, match="edit.save=model needs edit.mode=sequential"):
        run_edit(edit_cfg(tmp_path / "bad", "method=rome", *FAST, "edit.save=model"))
    with pytest.raises(ConfigError, match="edit.save"):
        run_edit(edit_cfg(tmp_path / "bad2", "method=rome", *FAST, "edit.save=disk"))
