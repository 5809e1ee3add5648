"""Weights held in half precision (`model.dtype=bfloat16|float16`): every method in conf/method edits a tiny random
Llama held in that dtype and reverts it bit-exactly; the scores stay finite and the weights keep their dtype.

The model is test_arch_matrix's word-level tiny Llama (one token per word, so a random model can be steered) with
its subject-last request, loaded through `model=hf` in the dtype under test. What "edits" means per method, as the
float32 tests assert it: the locate-then-edit methods and fine-tuning drive ES from 0 to 100; KN and the learned
editors (MEND, KE: untrained here, i.e. about a scaled gradient step) raise the new target's log-probability; an
untrained SERAC routes the edit to its counterfactual model and forgets it on restore."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_arch_matrix import REQ
from test_rome import WORDS
from tiny_archs import save_tiny

from kedit_pl.config import CONF_DIR, compose
from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.metrics import summarize
from kedit_pl.eval.scoring import score_requests
from kedit_pl.methods.base import MemoryEditMethod
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
#: a random 4-layer model's MLP outputs are tiny next to its residual stream: a wide clamp, more steps
_VALUES = ["method.v_num_grad_steps=80", "method.v_lr=1.0", "method.clamp_norm_factor=50",
           "method.v_weight_decay=0", "method.context_template_length_params=[[4,5]]"]
_MEMIT = [*_VALUES, "method.mom2_update_weight=1", "method.layers=[0,1]"]
#: per method: the overrides that make it edit the tiny model, and what its edit must achieve ("es": ES 0 -> 100,
#: "nll": the new target's NLL falls, "write": weights change, "route": SERAC sends the rewrite to its counterfactual model)
CASES: dict[str, tuple[list[str], str]] = {
    "ft": (["method.lr=5e-2", "method.steps=40", "method.layers=[1,2]"], "es"),
    "ft_l": (["method.lr=5e-2", "method.steps=40", "method.layers=[1,2]", "method.norm_constraint=5e-2"], "es"),
    "rome": (_VALUES, "es"),
    "r_rome": (_VALUES, "es"),
    "memit": (_MEMIT, "es"),
    "emmet": (_MEMIT, "es"),
    "alphaedit": (_MEMIT, "es"),
    # KN's update on a random model moves the new target either way (its neurons' activations have either sign):
    # only that it writes, restores and scores finitely (as test_knowledge_neurons asserts in float32)
    "kn": (["attribution.steps=4", "method.shared_frac=0.99"], "write"),
    "mend": (["method.rank=8", "method.norm=false", "method.edit_lr=1e-2"], "nll"),
    "ke": (["method.max_scale=20"], "nll"),
    "serac": (["method.encoder.source=tiny"], "route"),
    # memory methods never write a weight: GRACE's trained codebook value lowers the new target's NLL; IKE's
    # demonstrations only change what a random model reads ("memory": it remembers, weights untouched)
    "grace": (["method.n_iter=20"], "nll"),
    "ike": (["method.encoder.source=tiny", "method.pool.limit=40", "method.k=4"], "memory"),
    # WISE edits its side memory (main weights untouched) and routes the edited prompt to it
    "wise": (["method.n_iter=20", "method.act_margin=[0.5,2.0,1.0]"], "nll"),
    "malmen": (["method.rank=8", "method.norm=false", "method.edit_lr=1e-2"], "nll"),
}
#: methods whose edit lives outside the model's weights (a memory, a side copy, a counterfactual model)
OUTSIDE_WEIGHTS = ("serac", "ike", "grace", "wise")
DTYPES = ["bfloat16", "float16"]
#: the same edit/restore on CUDA (python -m pytest -m gpu), skipped where CUDA is absent (tests/conftest.py)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def test_every_method_has_a_case():
    assert sorted(CASES) == METHODS


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("half") / "llama")


def half_cfg(folder: Path, tmp: Path, method: str, dtype: str, *extra: str):
    corpus = tmp / "corpus.txt"
    corpus.write_text(" ".join(WORDS * 40))
    return compose("edit", ["model=hf", f"model.path={folder}", f"model.dtype={dtype}", f"method={method}",
                            "logger=csv", f"paths.output_dir={tmp}", f"paths.cache_dir={tmp / 'cache'}",
                            f"stats.corpus={corpus}", "stats.n_samples=800", "stats.seq_len=50",
                            f"stats.cache_dir={tmp / 'stats'}", "stats.progress=false", *extra])


def ready(editor, method: str, req: EditRequest) -> None:
    """What the learned editors and KN need before an edit: an editor (untrained here), a relation pool."""
    if method in ("mend", "ke", "serac", "malmen"):
        editor.ready = True
    if method == "kn":
        others = [replace(req, case_id=f"p{i}", subject=s) for i, s in enumerate(("Danielle Darrieux", "Rome"))]
        editor._pool = {req.relation_id: [req, *others]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_edit_and_restore_in_half_precision(method: str, dtype: str, device: str, folder: Path,
                                            tmp_path: Path) -> None:
    overrides, expect = CASES[method]
    accelerator = "gpu" if device == "cuda" else "cpu"
    cfg = half_cfg(folder, tmp_path, method, dtype, f"trainer.accelerator={accelerator}", *overrides)
    loaded = load_model(cfg.model)
    want = getattr(torch, dtype)
    assert all(p.dtype == want for p in loaded.model.parameters())
    editor = build_method(cfg, loaded)  # puts the model on trainer.accelerator's device
    assert all(p.device.type == device for p in editor.model.parameters())
    req = replace(REQ, relation_id="P1")

    def scores(r: EditRequest) -> dict:
        return score_requests(editor.logits_fn(), editor.tok, [r], device=device)[0]

    if summarize([scores(req)])["es"] != 0.0:  # edit towards the target the unedited model does not prefer
        req = replace(req, target_true=req.target_new, target_new=req.target_true)
    ready(editor, method, req)
    before = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
    pre = scores(req)
    handle = editor.apply([req])
    post = scores(req)
    assert all(p.dtype == want for p in editor.model.parameters())  # written back in the model's dtype
    nll = {when: s["rewrite"]["new"][0]["nll"] for when, s in (("pre", pre), ("post", post))}
    assert all(torch.isfinite(torch.tensor(s[g][k][0]["nll"])) for s in (pre, post) for g in ("rewrite",
               "neighborhood") for k in ("new", "true")), (pre, post)
    if expect == "es":
        assert summarize([pre])["es"] == 0.0 and summarize([post])["es"] == 100.0, (method, dtype, nll)
    elif expect == "nll":
        assert nll["post"] < nll["pre"], (method, dtype, nll, pre, post)
    elif expect == "route":  # SERAC: the rewrite is in scope of the one memorized edit, so the counterfactual model answers it
        assert len(editor.memory) == 1 and nll["post"] != nll["pre"]
    memory = isinstance(editor, MemoryEditMethod)
    changed = [k for k in before if not torch.equal(before[k], editor.model.state_dict()[k])]
    if method in OUTSIDE_WEIGHTS:
        assert not changed, "the edit wrote a base weight"
        assert editor.memory_size > 0 if memory else True
    else:
        assert changed, "the edit wrote no weight"
    editor.restore(handle)
    after = editor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    if method == "serac":
        assert len(editor.memory) == 0
    if memory:
        assert editor.memory_size == 0
    if method == "wise":
        assert editor.state.empty()
    assert scores(req) == pre  # the restored model scores exactly as before


def test_value_delta_is_optimized_in_float32_on_a_half_model(folder: Path, tmp_path: Path) -> None:
    """δ and its Adam state are float32 whatever the weights' dtype (half-precision Adam's eps underflows)."""
    from kedit_pl.kv.values import optimize_values

    loaded = load_model(half_cfg(folder, tmp_path, "rome", "float16").model)
    res = optimize_values(loaded.model, loaded.tokenizer, loaded.spec, [REQ], ["{}"], 1, steps=3, lr=1.0)
    assert res.delta.dtype == torch.float32 and torch.isfinite(res.delta).all() and res.delta.norm() > 0
    assert res.v_init.dtype == torch.float16  # read off the model as it is
