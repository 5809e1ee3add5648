"""The papers' models (GPT-2 XL, GPT-J-6B, Llama-2-7B, Llama-3-8B), built on the meta device from the sizes in their
YAML (no weights, no download): the YAML's module templates resolve on the real architecture, the parameter count is
the published one, and every method resolves its modules and their shapes on it."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kedit_pl.config import CONF_DIR, compose
from kedit_pl.data.requests import EditRequest
from kedit_pl.models.checks import check_arch
from kedit_pl.models.load import LoadedModel, _spec
from kedit_pl.models.sizes import meta_model
from kedit_pl.models.spec import linear_weight
from kedit_pl.models.tiny import byte_tokenizer
from kedit_pl.methods.base import MemoryEditMethod
from kedit_pl.pipeline import build_method

#: model -> (published parameter count in billions, d_ff, layers the paper edits with its method)
PAPERS = {
    "gpt2_xl": (1.558, 6400, {"rome": [17], "memit": [13, 14, 15, 16, 17]}),
    "gpt_j_6b": (6.05, 16384, {"rome": [5], "memit": [3, 4, 5, 6, 7, 8]}),
    "llama2_7b": (6.74, 11008, {"rome": [5], "memit": [4, 5, 6, 7, 8]}),
    "llama3_8b": (8.03, 14336, {"rome": [5], "memit": [4, 5, 6, 7, 8], "alphaedit": [4, 5, 6, 7, 8]}),
}
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
REQ = EditRequest(case_id="m0", subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                  target_true="French", target_new="English", relation_id="P103")


@pytest.fixture(scope="module", params=list(PAPERS))
def meta(request):
    cfg = compose("edit", [f"model={request.param}", "paths.output_dir=/tmp/kedit_meta"])
    c = OmegaConf.to_container(cfg.model, resolve=True)
    model = meta_model(c)
    spec = _spec(c)
    return request.param, model, spec


def test_templates_resolve_and_sizes_are_the_published_ones(meta):
    name, model, spec = meta
    check_arch(model, spec)  # every template names a real module; n_layers and hidden_size match
    assert all(p.device.type == "meta" for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n / 1e9 == pytest.approx(PAPERS[name][0], rel=0.01), n


@pytest.mark.parametrize("method", METHODS)
def test_every_method_resolves_its_modules_and_shapes(meta, method, tmp_path):
    name, model, spec = meta
    extra = ["method.encoder.source=tiny"] if method == "serac" else []
    cfg = compose("edit", [f"model={name}", f"method={method}", f"paths.output_dir={tmp_path}", *extra])
    editor = build_method(cfg, LoadedModel(model, byte_tokenizer(), spec))
    params = dict(model.named_parameters())
    # KN locates its neurons with the weights (integrated gradients): on the meta device, the MLP output
    # projections of every layer, which it may edit, are what resolve
    names = editor.edited_parameters([REQ]) if method != "kn" else \
        [spec.weight_name("mlp_out", i) for i in range(spec.n_layers)]
    if isinstance(editor, MemoryEditMethod) or method == "wise":  # writes no base weight: the module its memory
        assert not names                                              # (GRACE's codebook, WISE's side copy) sits at
        names = [f"{editor.module_name}.weight"] if hasattr(editor, "module_name") else []
    # SERAC and IKE neither write a weight nor sit at a module
    assert (names or method in ("serac", "ike")) and all(n in params for n in names)
    d, d_ff = spec.hidden_size, PAPERS[name][1]
    for n in names:  # the MLP projections, in (out, in) orientation whatever the module type (GPT-2's Conv1D)
        module = model.get_submodule(n.removesuffix(".weight"))
        assert tuple(linear_weight(module).shape) in ((d, d_ff), (d_ff, d)), (n, linear_weight(module).shape)
    paper = PAPERS[name][2].get(method)
    if paper is not None:
        edited = sorted({int(n.split(".")[2]) for n in names})  # model.layers.{i}... / transformer.h.{i}...
        assert edited == paper
    if method in ("mend", "ke"):  # the editor networks are built for these shapes
        assert sum(p.numel() for p in editor.editor.parameters()) > 0
        assert all(p.device.type != "meta" for p in editor.editor.parameters())
