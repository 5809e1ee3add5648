"""MEND on the tiny models: gradient decomposition, training, checkpoints, resume, restore, errors."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.methods.mend import MEND, request_nll
from kedit_pl.pipeline import run_edit, run_train
from kedit_pl.tokens import encode_targets
from tests.conftest import edit_cfg

REQS = [
    EditRequest("0", "Christiane Cohendy", "The mother tongue of {} is", "French", "German",
                paraphrases=("Christiane Cohendy's native language is",), loc="nq question: who wrote hamlet",
                loc_ans="William Shakespeare"),
    EditRequest("1", "Danielle Darrieux", "{} was born in the city of", "Bordeaux", "Oslo",
                paraphrases=("The birthplace of Danielle Darrieux is",), neighborhood=("Jean Gabin was born in",)),
    EditRequest("2", "Toko Yasuda", "{} plays the", "guitar", "piano"),  # no paraphrase, no locality prompt
]


def make(loaded, **kw) -> MEND:
    return MEND(loaded.model, loaded.tokenizer, loaded.spec, **({"layers": [1, 2, 3], "rank": 8} | kw))


def train_steps(m: MEND, n: int) -> list[float]:
    """n optimizer steps on a fixed batch; the edit loss before each step."""
    m.train()
    opt = m.configure_optimizers()
    losses = []
    for _ in range(n):
        out = m.losses(REQS)
        losses.append(out["edit_loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    m.ready = True
    return losses


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_identity_editor_update_is_minus_the_gradient(request, fixture):
    loaded = request.getfixturevalue(fixture)
    m = make(loaded, norm=False, edit_lr=1.0)  # U = 0: the editor is the identity; α = 1
    m.ready = True
    names = m.edited_parameters(REQS)
    params = dict(loaded.model.named_parameters())
    batch = encode_targets(loaded.tokenizer, [r.rewrite for r in REQS], [r.target_new for r in REQS])
    for n in names:
        params[n].requires_grad_(True)
    try:
        logits = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        grads = torch.autograd.grad(request_nll(logits, batch).sum(), [params[n] for n in names])
    finally:
        for n in names:
            params[n].requires_grad_(False)
    handle = m.apply(REQS)
    try:
        for n, g in zip(names, grads):
            torch.testing.assert_close(params[n] - handle.originals[n], -g, atol=1e-6, rtol=1e-4)
    finally:
        m.restore(handle)


def test_training_reduces_edit_loss_and_leaves_base_model_alone(tiny_llama):
    before = {n: p.clone() for n, p in tiny_llama.model.named_parameters()}
    losses = train_steps(make(tiny_llama, lr=1e-4), 6)
    assert losses[-1] < losses[0] - 1e-3
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())


def test_the_editor_mlp_itself_learns_from_the_first_step(tiny_llama):
    """U = 0 and b = 0 make every pre-activation exactly 0 at init; the nonlinearity must still pass a gradient
    there (the reference's clamp, not relu, whose gradient at 0 is 0 and leaves only α learning)."""
    m = make(tiny_llama, lr=1e-3)
    m.train()
    out = m.losses(REQS)
    out["loss"].backward()
    layers = [layer for net in m.editor.nets.values() for layer in net.layers]
    assert all(layer.U.grad is not None and layer.U.grad.abs().sum() > 0 for layer in layers)
    assert all(layer.b.grad.abs().sum() > 0 for layer in layers)
    opt = m.configure_optimizers()
    opt.step()
    net = next(iter(m.editor.nets.values()))
    net.eval()
    z = torch.randn(5, net.d_in + net.d_out)
    u, d = z.split([net.d_in, net.d_out], -1)
    got = torch.cat(net(u, d, 0), -1)
    assert not torch.allclose(got, net.normalize(z))  # no longer the identity: the MLP moved


def test_restore_after_apply_is_bit_exact(tiny_llama):
    m = make(tiny_llama)
    train_steps(m, 2)
    before = {n: p.clone() for n, p in tiny_llama.model.named_parameters()}
    m.eval()
    handle = m.apply(REQS[:1])
    assert any(not torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())
    m.restore(handle)
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())


def test_export_and_load_round_trip(tiny_llama, tiny_gpt2, tmp_path):
    m = make(tiny_llama)
    train_steps(m, 2)
    assert set(m.state_dict()) and all(k.startswith("editor.") for k in m.state_dict())
    m.export(tmp_path / "editor")
    assert (tmp_path / "editor" / "editor.json").is_file()
    for path in (tmp_path / "editor", tmp_path / "editor" / "editor.safetensors"):
        m2 = make(tiny_llama, rank=4, checkpoint=str(path))  # the checkpoint's architecture wins
        s1, s2 = m.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
        edits = []
        for method in (m, m2):
            method.eval()
            handle = method.apply(REQS[:1])
            edits.append({n: p.clone() for n, p in tiny_llama.model.named_parameters()})
            method.restore(handle)
        assert all(torch.equal(edits[0][n], edits[1][n]) for n in edits[0])
    with pytest.raises(ConfigError, match="trained for model 'tiny_llama'"):
        make(tiny_gpt2, checkpoint=str(tmp_path / "editor"))


def test_edit_without_checkpoint_fails_loudly(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="method.checkpoint"):
        run_edit(edit_cfg(tmp_path, "method=mend"))
    with pytest.raises(ConfigError, match="method.checkpoint"):
        make(tiny_llama).apply(REQS[:1])
    with pytest.raises(ConfigError, match="method.checkpoint"):
        make(tiny_llama, checkpoint=str(tmp_path / "nope"))


def write_zsre(path, n: int) -> str:
    """A small training file in MEND's zsRE format (fast to load, independent of the shared data)."""
    rows = [{"case_id": i, "subject": f"Person {i}", "src": f"What is the native language of Person {i}?",
             "rephrase": f"What is Person {i}'s mother tongue?", "alt": "German", "answers": ["French"],
             "loc": "nq question: who wrote hamlet", "loc_ans": "William Shakespeare"} for i in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def test_train_resumes_at_the_right_step_and_checkpoints_hold_only_the_editor(tmp_path, tiny_llama):
    data = write_zsre(tmp_path / "train.json", 30)
    common = ["method=mend", "method.rank=8", "dataset=zsre", f"dataset.train.path={data}", "train.batch_size=4",
              "train.val_edits=2", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
              "trainer.log_every_n_steps=1", "train.checkpoint_every_n_steps=2"]
    first = run_train(edit_cfg(tmp_path, *common, "trainer.max_steps=4", config_name="train"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert first["global_step"] == 4 and ckpt["global_step"] == 4
    assert all(k.startswith("editor.") for k in ckpt["state_dict"])  # no frozen base-model weights
    second = run_train(edit_cfg(tmp_path, *common, "trainer.max_steps=6", "train.resume=true", config_name="train"))
    assert second["global_step"] == 6
    rows = list(csv.DictReader((tmp_path / "csv" / "version_1" / "metrics.csv").open()))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps == [4, 5]  # the resumed run trained only the remaining steps
    assert second["exported_from"] == second["best_checkpoint"]  # the best validated editor is exported
    best = second["best_checkpoint"]
    exported, from_ckpt = make(tiny_llama, checkpoint=second["export"]), make(tiny_llama, checkpoint=best)
    assert all(torch.equal(v, from_ckpt.state_dict()[k]) for k, v in exported.state_dict().items())


def test_fast_dev_run_validates_one_batch_of_edits(tmp_path, monkeypatch):
    """trainer.fast_dev_run=true: the edit-validation callback applies one validation batch of edits, not all
    train.val_edits (it scored every one of them, which made a fast dev run of MEND on zsRE take over 10 min)."""
    from kedit_pl.eval.val_callback import EditValidationCallback

    scored: list[int] = []
    score = EditValidationCallback._score
    monkeypatch.setattr(EditValidationCallback, "_score",
                        lambda self, m, chunk: scored.append(len(chunk)) or score(self, m, chunk))
    data = write_zsre(tmp_path / "train.json", 200)  # 10 validation records
    out = run_train(edit_cfg(tmp_path, "method=mend", "method.rank=8", "dataset=zsre", f"dataset.train.path={data}",
                             "train.batch_size=2", "train.val_edits=32", "trainer.fast_dev_run=true", "seed=3",
                             config_name="train"))
    assert 0 < sum(scored) <= 2 * 2  # one batch of 2: unedited once, edited once
    assert out["seed"] == 3 and json.loads((tmp_path / "train_summary.json").read_text())["seed"] == 3


def test_training_seed_decides_the_validation_split_and_the_shuffle(tmp_path):
    """`seed=` is a knob of learned editors: the same seed gives the same held-out edits, another seed others."""
    from kedit_pl.data.datamodule import EditDataModule

    data = write_zsre(tmp_path / "train.json", 200)
    cfg = {"path": data, "format": "zsre", "train": {"path": data, "format": "zsre", "exclude_eval": False}}

    def val_ids(seed: int) -> list[str]:
        dm = EditDataModule(cfg, seed=seed)
        dm.prepare_training()
        return [r.case_id for r in dm.val_requests]

    assert val_ids(0) == val_ids(0) != val_ids(1)

