"""KnowledgeEditor on the tiny models: generator shapes and rank-1 factors, the update formula by hand, the
Lagrangian's ascent and clamp, the margin schedule, train -> export -> edit, bit-exact restore, bad checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from kedit_pl.errors import ConfigError
from kedit_pl.methods.ke import KE
from kedit_pl.methods.ke_net import KEConfig, MatrixGenerator
from kedit_pl.methods.mend import MEND
from kedit_pl.pipeline import run_edit, run_train
from tests.conftest import edit_cfg
from tests.test_mend import REQS, write_zsre


def make(loaded, **kw) -> KE:
    return KE(loaded.model, loaded.tokenizer, loaded.spec, **({"layers": [1, 2], "max_scale": 1.0} | kw))


def train_steps(m: KE, n: int, reqs=REQS) -> list[dict[str, float]]:
    """n optimizer steps on a fixed batch through the same hooks Lightning calls."""
    m.train()
    opt = m.configure_optimizers()
    logs = []
    for _ in range(n):
        out = m.losses(reqs)
        logs.append({k: float(v) for k, v in out.items()})
        opt.zero_grad()
        out["loss"].backward()
        m.on_before_optimizer_step(opt)
        opt.step()
        m.on_train_batch_end(None, reqs, 0)
    m.ready = True
    return logs


def test_generator_shapes_and_rank_one_factors():
    torch.manual_seed(0)
    cfg = KEConfig(params=(("w", 6, 4),), embed_dim=8, lstm_dim=5, condition_dim=7, hidden_dim=3, max_scale=2.0)
    gen = MatrixGenerator(6, 4, cfg)
    for p in gen.parameters():  # move off the initialization, so nothing below holds by construction only
        p.data.add_(torch.randn_like(p) * 0.3)
    c = torch.randn(3, 7)
    a, b, gate = gen.factors(c)
    assert a.shape == b.shape == (3, 6, 4) and gate.shape == (3,)
    for t in (a, b):
        assert all(torch.linalg.matrix_rank(t[e]) == 1 for e in range(3))
    out = gen.net(c)
    col_a, row_a = out[:, :4], out[:, 4:10]
    torch.testing.assert_close(a, row_a.softmax(-1)[:, :, None] * col_a[:, None, :])  # softmax(row) ⊗ col
    assert gen(c, torch.randn(3, 6, 4)).shape == (3, 6, 4)


def test_condition_is_the_lms_embeddings_of_prediction_alternative_input(tiny_llama):
    m = make(tiny_llama)
    embeds, mask = m.condition(REQS)
    emb = tiny_llama.model.get_input_embeddings()
    for i, r in enumerate(REQS):
        ids = tiny_llama.tokenizer(f"{r.target_true} >> {r.target_new} || {r.rewrite}",
                                   add_special_tokens=False)["input_ids"]
        assert int(mask[i].sum()) == len(ids) and bool(mask[i, :len(ids)].all())  # right-padded
        torch.testing.assert_close(embeds[i, :len(ids)], emb(torch.tensor(ids)))
    assert embeds.shape == (3, int(mask.sum(-1).max()), emb.weight.shape[1])


def test_conditioner_bilstm_ffnn_shapes_and_padding():
    from kedit_pl.methods.ke_net import Conditioner

    torch.manual_seed(0)
    cond = Conditioner(embed_dim=6, lstm_dim=5, condition_dim=7)
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    c = cond(x, mask)
    assert c.shape == (2, 7) and c.abs().max() < 1  # FFNN with tanh
    torch.testing.assert_close(c[1], cond(x[1:, :2], mask[1:, :2])[0])  # padding is never read
    assert not torch.allclose(cond(x[:1].flip(1), mask[:1])[0], c[0])  # order matters (a sequence model)
    lstm = cond.lstm
    assert lstm.bidirectional and lstm.num_layers == 1 and cond.ffnn.in_features == 2 * 5


def test_update_formula_by_hand_on_a_toy_matrix():
    cfg = KEConfig(params=(("w", 2, 3),), embed_dim=8, condition_dim=4, hidden_dim=3, max_scale=5.0)
    gen = MatrixGenerator(2, 3, cfg)
    col_a, row_a = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, torch.log(torch.tensor(3.0))])
    col_b, row_b, eta = torch.tensor([0.1, 0.2, -0.3]), torch.tensor([0.0, 0.0]), torch.tensor([0.0])
    wanted = torch.cat([col_a, row_a, col_b, row_b, eta])
    gen.net.forward = lambda c: wanted.expand(c.shape[0], -1)  # fix the MLP's output, check the algebra after it
    grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # softmax([0, log 3]) = [1/4, 3/4]; a = [[1/4], [3/4]] ⊗ col_a; b = [[1/2], [1/2]] ⊗ col_b; σ(0) = 1/2
    a = torch.tensor([[0.25, -0.5, 0.125], [0.75, -1.5, 0.375]])
    b = torch.tensor([[0.05, 0.1, -0.15], [0.05, 0.1, -0.15]])
    expected = 5.0 * 0.5 * (grad * a + b)
    torch.testing.assert_close(gen(torch.zeros(1, 4), grad[None])[0], expected)


def test_initial_editor_is_a_gradient_descent_step(tiny_llama):
    m = make(tiny_llama, layers=[1], modules=["mlp_out"], max_scale=2.0)
    nll, factors, mask = m.gradient_factors(REQS[:1])
    (u, d), = factors.values()
    grad = torch.einsum("bto,bti->boi", d, u)
    delta = m.request_deltas(REQS[:1], factors, mask)[m.edited_parameters(REQS)[0]]
    # ΔW ≈ −(max_scale/2) · softmax(row) ⊙ ∇W with a near-uniform softmax: a descent direction of that size
    cos = torch.nn.functional.cosine_similarity(delta.flatten(), -grad.flatten(), dim=0)
    assert cos > 0.9
    ratio = delta.norm() / (grad.norm() * 2.0 / 2 / grad.shape[1])
    assert 0.5 < ratio < 2.0


def test_lagrange_multiplier_ascends_while_kl_exceeds_the_margin_and_stays_nonnegative(tiny_llama):
    m = make(tiny_llama, max_scale=50.0, lr_alpha=0.1, margin_max=1e-9, margin_min=1e-9)
    logs = train_steps(m, 3)
    assert all(r["loc_loss"] > 1e-9 for r in logs)  # the edits move the locality answers
    assert [round(r["lagrange"], 3) for r in logs] == [1.0, 1.1, 1.2]  # Adam's first steps: lr_alpha each, upward
    m2 = make(tiny_llama, max_scale=1e-6, lr_alpha=0.4, margin_max=10.0, margin_min=10.0)  # KL far below margin
    logs = train_steps(m2, 4)
    assert [round(r["lagrange"], 3) for r in logs] == [1.0, 0.6, 0.2, 0.0]  # descends, then clamped at 0
    assert float(m2.editor.lagrange) == 0.0


def test_margin_shrinks_only_when_validation_edits_succeed(tiny_llama):
    m = make(tiny_llama, margin_max=1e-3, margin_min=5e-4, margin_decay=0.8, margin_above=90.0)
    m.log = lambda *a, **k: None  # outside a Trainer
    m.on_edit_validation({"rewrite_acc": 89.0})
    assert float(m.editor.margin) == pytest.approx(1e-3)
    m.on_edit_validation({"rewrite_acc": 95.0})
    assert float(m.editor.margin) == pytest.approx(8e-4)
    m.on_edit_validation({"rewrite_acc": 95.0})
    m.on_edit_validation({"rewrite_acc": 95.0})
    assert float(m.editor.margin) == pytest.approx(5.12e-4)  # 1e-3 · 0.8³
    m.on_edit_validation({"rewrite_acc": 95.0})
    assert float(m.editor.margin) == pytest.approx(5e-4)  # floored at margin_min


def test_training_reduces_the_edit_loss_and_leaves_the_base_model_alone(tiny_llama):
    before = {n: p.clone() for n, p in tiny_llama.model.named_parameters()}
    m = make(tiny_llama, lr=3e-3, max_scale=20.0)
    lstm_before = [p.clone() for p in m.editor.conditioner.parameters()]
    logs = train_steps(m, 8)
    assert logs[-1]["edit_loss"] < logs[0]["edit_loss"] - 1e-3
    assert all(not torch.equal(p, q) for p, q in zip(m.editor.conditioner.parameters(), lstm_before))
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_restore_is_bit_exact_and_batch_edit_is_the_sum_of_single_edits(request, fixture):
    loaded = request.getfixturevalue(fixture)
    m = make(loaded, max_scale=20.0)
    train_steps(m, 2)
    m.eval()
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    singles = []
    for r in REQS[:2]:
        h = m.apply([r])
        singles.append({n: p - before[n] for n, p in loaded.model.named_parameters() if n in h.originals})
        m.restore(h)
    h = m.apply(REQS[:2])
    assert any(not torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
    for n in h.originals:
        torch.testing.assert_close(dict(loaded.model.named_parameters())[n] - before[n],
                                   singles[0][n] + singles[1][n], atol=1e-6, rtol=1e-4)
    m.restore(h)
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())


def test_train_export_edit_end_to_end(tmp_path, tiny_llama):
    data = write_zsre(tmp_path / "train.json", 24)
    out = run_train(edit_cfg(tmp_path / "train", "method=ke", "method.max_scale=20", "dataset=zsre",
                             f"dataset.train.path={data}", "train.batch_size=4", "train.val_edits=2",
                             "trainer.max_steps=3", "trainer.val_check_interval=3", "+trainer.limit_val_batches=1",
                             "train.checkpoint_every_n_steps=3",
                             "trainer.log_every_n_steps=1", config_name="train"))
    editor = tmp_path / "train" / "editor"
    meta = json.loads((editor / "editor.json").read_text())
    assert out["global_step"] == 3 and out["exported_from"] == out["best_checkpoint"]
    assert meta["method"] == "ke" and meta["model"] == "tiny_llama" and meta["layers"] == [1, 2, 3]
    ckpt = torch.load(out["best_checkpoint"], map_location="cpu", weights_only=True)
    assert all(k.startswith("editor.") for k in ckpt["state_dict"])  # no frozen base-model weights
    exported, from_ckpt = make(tiny_llama, checkpoint=str(editor)), make(tiny_llama, checkpoint=out["best_checkpoint"])
    assert all(torch.equal(v, from_ckpt.state_dict()[k]) for k, v in exported.state_dict().items())
    for mode in ("single", "batch", "sequential"):
        summary = run_edit(edit_cfg(tmp_path / mode, "method=ke", f"method.checkpoint={editor}", "dataset=zsre",
                                    f"dataset.path={data}", f"edit.mode={mode}", "edit.batch_size=2",
                                    "edit.lifelong.every=0", "eval.cache_pre=false"))
        assert summary["timing"]["n_edits"] == 3 and "es" in summary["post"]


def test_bad_checkpoints_are_one_line_errors_naming_what_was_expected(tmp_path, tiny_llama, tiny_gpt2):
    with pytest.raises(ConfigError, match="method.checkpoint: KE edits with a trained editor") as e:
        run_edit(edit_cfg(tmp_path / "none", "method=ke"))
    mend = MEND(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, layers=[1, 2, 3], rank=8)
    mend.editor.nets[next(iter(mend.editor.nets))].count.fill_(2)
    mend.export(tmp_path / "mend")
    ke = make(tiny_llama)
    ke.export(tmp_path / "ke")
    cases = [(str(tmp_path / "mend"), "model=tiny_llama", "holds a MEND editor, but method=ke needs a KE editor"),
             (str(tmp_path / "mend" / "editor.safetensors"), "model=tiny_llama", "holds a MEND editor"),
             (str(tmp_path / "ke"), "model=tiny_gpt2", "KE editor trained for model 'tiny_llama', not 'tiny_gpt2'")]
    for path, model, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            run_edit(edit_cfg(tmp_path / "run", "method=ke", f"method.checkpoint={path}", model))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="holds a KE editor, but method=mend needs a MEND editor"):
        MEND(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, layers=[1], checkpoint=str(tmp_path / "ke"))
    serac = tmp_path / "serac"
    serac.mkdir()
    (serac / "config.json").write_text('{"format": "kedit_pl.serac/1"}')
    with pytest.raises(ConfigError, match="holds a SERAC editor, but method=ke needs a KE editor"):
        make(tiny_llama, checkpoint=str(serac))


def test_best_checkpoint_holds_the_weights_its_validation_score_was_measured_on(tmp_path, monkeypatch):
    """Each validation's score goes with the weights it measured (not with a later step's weights)."""
    import csv

    from kedit_pl.eval import val_callback

    scores = iter([10.0, 50.0, 20.0])  # the second validation is the best
    monkeypatch.setattr(val_callback, "edit_success", lambda m: next(scores))
    data = write_zsre(tmp_path / "train.json", 24)
    out = run_train(edit_cfg(tmp_path, "method=ke", "method.max_scale=20", "method.lr=3e-3", "dataset=zsre",
                             f"dataset.train.path={data}", "train.batch_size=4", "train.val_edits=3",
                             "trainer.max_steps=6", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
                             "train.checkpoint_every_n_steps=2", "train.patience=10", config_name="train"))
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    val = {int(r["step"]): float(r["val/edit_success"]) for r in rows if r.get("val/edit_success")}
    ckpt = torch.load(out["best_checkpoint"], map_location="cpu", weights_only=True)
    assert len(val) == 3 and out["best_score"] == pytest.approx(max(val.values()))
    assert val[ckpt["global_step"] - 1] == pytest.approx(out["best_score"])  # logged at the step it was saved
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_validation_selection_includes_locality_on_both_datasets():
    from kedit_pl.eval.val_callback import edit_success, loc_kept

    cf = {"es": 100.0, "ps": 80.0, "ns": 20.0, "rewrite_acc": 50.0, "paraphrase_acc": 40.0}
    assert edit_success(cf) == pytest.approx(3 / (1 / 100 + 1 / 80 + 1 / 20))  # Score
    assert edit_success(cf | {"loc_kept": 50.0}) == pytest.approx(4 / (1 / 100 + 1 / 80 + 1 / 20 + 1 / 50))
    zsre = {"es": 100.0, "ps": 100.0, "rewrite_acc": 60.0, "paraphrase_acc": 50.0}
    assert loc_kept({"loc_acc": 0.4}, {"loc_acc": 0.2}) == 50.0 and loc_kept({"loc_acc": 0.4}, {"loc_acc": 0.5}) == 100
    assert edit_success(zsre | {"loc_kept": 50.0}) == pytest.approx(3 / (1 / 60 + 1 / 50 + 1 / 50))
    assert edit_success(zsre | {"loc_kept": 0.0}) == 0.0  # an editor that wipes out the unrelated answers loses
