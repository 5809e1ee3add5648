"""Any decoder without a family YAML (`model=hf model.path=<folder>`): the architecture is inferred, ROME and
MEMIT edit it through the inferred modules, drive ES to 1 and restore it bit-exactly. One tiny random model per
architecture.

The synthetic fact is one a random model can be steered on: its rewrite prompt ends with the subject, so the
subject's last token, where ROME's and MEMIT's value δ acts, is the prediction position. (With the target two
tokens after the subject, δ reaches the prediction only through random attention, whose pre-norm inputs bound
what one token can carry: the value NLL stays at 2.3-3.7 nats against ln 45 = 3.8 for a uniform guess, and ES is
a coin flip.) The data validation rejects such prompts for real records (issue 3: a subject at the end of a prompt
is likely a malformed record); `SubjectLast` skips that one rule for this request, every other rule still applies.
Asserted: ES = 1 after the edit (0 before), the value optimization lowers the new target's NLL through this
architecture's blocks, the weight update realizes the optimized value at the insertion point (through the
module's own forward: Conv1D orientation, fused projections, OPT's flattened tokens), only the edited
projections change, and restore is bit-exact."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import nn
from test_rome import WORDS
from tiny_archs import ARCHS, save_tiny
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, T5Config

from kedit_pl.config import compose
from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.eval.metrics import summarize
from kedit_pl.eval.scoring import score_requests
from kedit_pl.hooks import capture
from kedit_pl.kv.keys import subject_prompts
from kedit_pl.kv.values import optimize_values
from kedit_pl.models.infer import infer_arch
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method
from kedit_pl.tokens import prompt_ids

pytestmark = pytest.mark.usefixtures("one_thread")



@dataclass(frozen=True)
class SubjectLast(EditRequest):
    """An edit request whose prompt may end with the subject (see the module docstring)."""

    def validate(self) -> "SubjectLast":
        EditRequest.validate(replace(self, prompt=self.prompt + " is"))  # every other rule
        return self


REQ = SubjectLast(case_id="s0", subject="Toko Yasuda", prompt="the instrument of {}", target_true="piano",
                  target_new="guitar", neighborhood=("the instrument of Danielle Darrieux",))
#: module names the inference must find, per architecture (the rest is checked by load_model's check_arch)
EXPECTED = {
    "gpt2": ("transformer.h.{}.mlp.c_proj", "transformer.h.{}.attn.c_proj", "transformer.ln_f"),
    "gptj": ("transformer.h.{}.mlp.fc_out", "transformer.h.{}.attn.out_proj", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}.attention.dense",
                 "gpt_neox.final_layer_norm"),
    "phi3": ("model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj", "model.norm"),
    "opt": ("model.decoder.layers.{}.fc2", "model.decoder.layers.{}.self_attn.out_proj",
            "model.decoder.final_layer_norm"),
    "falcon": ("transformer.h.{}.mlp.dense_4h_to_h", "transformer.h.{}.self_attention.dense", "transformer.ln_f"),
}
LLAMA_LIKE = ("model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj", "model.norm")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {a: save_tiny(a, root / a) for a in ARCHS}


def hf_cfg(folder: Path, tmp: Path, method: str, *extra: str):
    """model=hf on a folder; few value steps and a small key-statistics sample keep each case about a second."""
    corpus = tmp / "corpus.txt"
    corpus.write_text(" ".join(WORDS * 40))
    return compose("edit", ["model=hf", f"model.path={folder}", f"method={method}", "logger=csv",
                            f"paths.output_dir={tmp}", f"stats.corpus={corpus}", "stats.n_samples=800",
                            "stats.seq_len=50", f"stats.cache_dir={tmp / 'stats'}", "stats.progress=false",
                            # a random model's MLP outputs are tiny next to its residual stream: a wide clamp
                            "method.v_num_grad_steps=80", "method.v_lr=1.0", "method.clamp_norm_factor=50",
                            "method.v_weight_decay=0", "method.context_template_length_params=[[4,5]]", *extra])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


#: architectures whose blocks RMS-norm the MLP output before the residual add (Gemma 2/3)
POST_NORMED = {"gemma2", "gemma3_text"}


@pytest.mark.parametrize("method", ["rome", "memit"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_edit_any_architecture(arch: str, method: str, folders: dict[str, Path], tmp_path: Path) -> None:
    # MEMIT: z one layer lower than the default range ends (two blocks above carry it on a 4-layer random model)
    extra = ["method.mom2_update_weight=1", "method.layers=[0,1]"] if method == "memit" else []
    cfg = hf_cfg(folders[arch], tmp_path, method, *extra)
    editor = build_method(cfg)
    # AutoTokenizer rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer, which breaks the word-level test
    # vocabulary (every word becomes <unk>); the folder's own tokenizer.json, loaded as it is, keeps it
    editor.tok = PreTrainedTokenizerFast.from_pretrained(folders[arch])
    spec = editor.spec
    assert spec.name == f"hf_{arch}" and spec.family == arch and spec.n_layers == 4
    assert (spec.mlp_out, spec.attn_out, spec.final_norm) == EXPECTED.get(arch, LLAMA_LIKE)
    assert spec.mlp_post_norm == ("model.layers.{}.post_feedforward_layernorm" if arch in POST_NORMED else None)
    before = _state(editor.model)

    def es(req: EditRequest) -> float:
        return summarize(score_requests(editor.logits_fn(), editor.tok, [req]))["es"]

    req = REQ if es(REQ) == 0.0 else replace(REQ, target_true=REQ.target_new, target_new=REQ.target_true)
    assert es(req) == 0.0  # the new target starts out as the less likely one
    insert = "mlp_out" if method == "rome" else "layer"
    site = spec.module_name(insert, editor.layer)
    plain = subject_prompts(editor.tok, [req], ["{}"])[0]
    text, pos = plain.text, plain.subject_idx
    hp = {**editor.hp, "steps": 1}
    unedited = optimize_values(editor.model, editor.tok, spec, [req], editor.templates(), editor.layer, insert=insert,
                               loss_layer=editor.loss_layer, **hp)  # one step: the NLL at δ = 0
    h0 = _site_output(editor, site, text, pos)
    handle = editor.apply([req])
    value = handle.info["per_request"][0]
    assert es(req) == 100.0, (arch, method, value)  # ES = 1: the new target overtakes the true one
    # the value optimization moves the new target through this architecture's upper blocks
    assert value["nll"] < unedited.nll[0].item() - 0.5, (value, unedited.nll)
    # the update realizes the optimized value at the insertion point (plain prompt, subject's last token)
    moved = (_site_output(editor, site, text, pos) - h0).norm().item()
    if method == "rome":  # W'k = v exactly at the plain key (constraint_key=plain): the output moves by δ
        assert moved == pytest.approx(value["delta_norm"], rel=1e-3), (moved, value)
    elif arch in POST_NORMED:
        # each layer's normed MLP output lies on {g ⊙ u : rms(u) = 1}, ‖·‖ ≈ 8 here, so the block output moves
        # toward z (z − h ≈ 60, from clamp_norm_factor 50) by no more than the two layers' reach; the update
        # targets the MLP output through the norm (kv/post_norm.py, unit-tested in test_memit.py)
        first, last = handle.info["layers"][0]["z_error"], handle.info["final_z_error"]
        assert last <= 0.8 * first, handle.info
    else:  # MEMIT's least squares over two layers: the block output reaches z up to a small residual
        assert handle.info["final_z_error"] <= 0.05 * handle.info["layers"][0]["z_error"], handle.info
        assert moved == pytest.approx(value["delta_norm"], rel=0.05), (moved, value)
    changed = [k for k in before if not torch.equal(before[k], editor.model.state_dict()[k])]
    assert changed and all(".".join(k.split(".")[:-1]) in [spec.module_name("mlp_out", i) for i in range(4)]
                           for k in changed)
    editor.restore(handle)
    after = editor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@torch.no_grad()
def _site_output(editor, site: str, text: str, pos: int) -> torch.Tensor:
    """The output of module `site` at token `pos` of `text` (float64 for the comparison)."""
    ids = torch.tensor([prompt_ids(editor.tok, text)])
    with capture(editor.model, [site]) as cap:
        editor.model(input_ids=ids)
    return cap.outputs[site][0, pos].double()


def test_missing_mlp_is_one_line() -> None:
    config = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)
    model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        layer.mlp.down_proj = nn.Identity()
    with pytest.raises(ConfigError) as e:
        infer_arch(model)
    msg = str(e.value)
    assert "\n" not in msg and "MLP output projection" in msg and "up_proj 16->32" in msg and "gate_proj" in msg


def test_folder_that_is_not_a_causal_lm(tmp_path: Path) -> None:
    T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path / "t5")
    (tmp_path / "empty").mkdir()
    for folder, needle in ((tmp_path / "t5", "'t5' model, which is not a causal"),
                           (tmp_path / "empty", "has no config.json"),
                           (tmp_path / "nowhere", "is not a folder")):
        with pytest.raises(ConfigError, match=needle) as e:
            load_model(compose("edit", ["model=hf", f"model.path={folder}", "paths.output_dir=/tmp"]).model)
        assert "\n" not in str(e.value)


def test_arch_override_wins(folders: dict[str, Path]) -> None:
    cfg = compose("edit", ["model=hf", f"model.path={folders['llama']}", "paths.output_dir=/tmp",
                           "+model.arch_override.mlp_in='model.layers.{}.mlp.gate_proj'"])
    assert load_model(cfg.model).spec.mlp_in == "model.layers.{}.mlp.gate_proj"
    assert cfg.method.name == "ft_l" and cfg.model.method_defaults.rome.layer == 1
