"""Any decoder without a family YAML (`model=hf model.path=<folder>`): the architecture is inferred, ROME and
MEMIT edit it (ES 100 on a synthetic fact) and restore it bit-exactly. One tiny model per architecture."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from test_rome import REQ_W, WORDS
from tiny_archs import ARCHS, save_tiny
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, T5Config

from kedit_pl.config import compose
from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.eval.metrics import summarize
from kedit_pl.eval.scoring import score_requests
from kedit_pl.models.infer import infer_arch
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method

pytestmark = pytest.mark.usefixtures("one_thread")

REQ = replace(REQ_W, neighborhood=("Danielle Darrieux plays the instrument",))
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


#: (arch, method) pairs whose value optimization cannot flip the random model (the target's NLL stays near uniform,
#: 3.3 of ln 45 = 3.8, for the gpt2 z at layer 1; fast and full paths agree): a fact of the random weights, not of
#: the inference (both archs pass with ROME, and with other seeds other pairs fail instead). strict: a pass is news
UNSTEERABLE = {("gpt2", "memit"), ("phi3", "memit")}


def _cases() -> list:
    return [pytest.param(a, m, marks=pytest.mark.xfail(strict=True, reason="random tiny model not steerable"))
            if (a, m) in UNSTEERABLE else (a, m) for a in ARCHS for m in ("rome", "memit")]


@pytest.mark.parametrize("arch,method", _cases())
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
    before = _state(editor.model)

    def es(req: EditRequest) -> float:
        return summarize(score_requests(editor.logits_fn(), editor.tok, [req]))["es"]

    req = REQ if es(REQ) == 0.0 else replace(REQ, target_true=REQ.target_new, target_new=REQ.target_true)
    assert es(req) == 0.0  # the new target starts out as the less likely one
    handle = editor.apply([req])
    assert es(req) == 100.0, handle.info
    changed = [k for k in before if not torch.equal(before[k], editor.model.state_dict()[k])]
    assert changed and all(".".join(k.split(".")[:-1]) in [spec.module_name("mlp_out", i) for i in range(4)]
                           for k in changed)
    editor.restore(handle)
    after = editor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


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
