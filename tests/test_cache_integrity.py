"""Damaged caches are detected, named, rebuilt, and give the undamaged result; damaged checkpoints are one
line (issue #14 §2)."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import KEditError
from kedit_pl.io import DIGEST_KEY, read_cache, read_tensors, save_cache, save_tensors
from kedit_pl.kv.stats import second_moment
from kedit_pl.kv.value_cache import cached_values, request_file
from kedit_pl.kv.values import ValueResult
from tests.test_stats import cfg, corpus  # noqa: F401  (the corpus fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def truncate(p):
    os.truncate(p, p.stat().st_size // 3)


def noise_in_data(p):
    """Same size, header intact: only the tensor bytes change (what a size check cannot see)."""
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.seek(size - 64)
        f.write(os.urandom(64))


def noise_everywhere(p):
    p.write_bytes(os.urandom(p.stat().st_size))


DAMAGE = [truncate, noise_in_data, noise_everywhere]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_statistics_are_named_rebuilt_and_equal(tiny_llama, corpus, tmp_path, damage, caplog):  # noqa: F811
    c = cfg(corpus, tmp_path / "cache")
    args = (tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, [1])
    good = second_moment(*args, c)[1]
    (path,) = [p for p in (tmp_path / "cache").rglob("*.safetensors") if "partial" not in p.name]
    damage(path)
    with caplog.at_level(logging.WARNING):
        again = second_moment(*args, c)[1]
    assert str(path) in caplog.text and "damaged" in caplog.text and "positive definite" not in caplog.text
    assert torch.equal(again, good)
    assert torch.equal(read_cache(path, "test")["mom2"], good)  # replaced by a valid entry


def test_statistics_written_without_a_digest_are_still_checked(tiny_llama, corpus, tmp_path, caplog):  # noqa: F811
    """Files from before digests: a garbage matrix is not a second moment (not symmetric) -> rebuilt."""
    c = cfg(corpus, tmp_path / "cache")
    args = (tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, [1])
    good = second_moment(*args, c)[1]
    (path,) = [p for p in (tmp_path / "cache").rglob("*.safetensors") if "partial" not in p.name]
    t, meta = read_tensors(path, "test")
    save_tensors(path, {"mom2": torch.randn_like(t["mom2"]), "count": t["count"]},
                 metadata={k: v for k, v in meta.items() if k != DIGEST_KEY})
    with caplog.at_level(logging.WARNING):
        assert torch.equal(second_moment(*args, c)[1], good)
    assert "not a symmetric second moment" in caplog.text


def _requests(n):
    return [EditRequest(case_id=str(i), subject=f"S{i}", prompt="{} is", target_true="a", target_new="b")
            for i in range(n)]


def _compute(calls):
    def compute(reqs):
        calls.extend(r.case_id for r in reqs)
        ids = torch.tensor([float(r.case_id) for r in reqs])
        return ValueResult(ids[:, None] * torch.ones(len(reqs), 4), -ids[:, None] * torch.ones(len(reqs), 4),
                           ids, ids / 10, [3] * len(reqs), 1.0)
    return compute


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_z_entries_are_named_recomputed_and_equal(tmp_path, damage, caplog):
    reqs, calls = _requests(3), []
    good = cached_values(tmp_path, reqs, _compute(calls), group=2, device=torch.device("cpu"))
    bad = request_file(tmp_path, reqs[1])
    damage(bad)
    calls.clear()
    with caplog.at_level(logging.WARNING):
        again = cached_values(tmp_path, reqs, _compute(calls), group=2, device=torch.device("cpu"))
    assert calls == ["1"] and str(bad) in caplog.text  # only the damaged entry is recomputed, and named
    for f in ("delta", "v_init", "nll", "kl"):
        assert torch.equal(getattr(again, f), getattr(good, f))
    assert again.cached == 2 and read_cache(bad, "test") is not None


def test_cache_digest_detects_a_single_flipped_value(tmp_path):
    p = tmp_path / "x.safetensors"
    save_cache(p, {"a": torch.arange(8.0)})
    t, meta = read_tensors(p, "t")
    save_tensors(p, {"a": t["a"] + torch.eye(1, 8)[0]}, metadata=meta)  # same digest field, other bytes
    assert read_cache(p, "t") is None and not p.exists()


@pytest.mark.parametrize("damage", [truncate, noise_everywhere], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["mend_safetensors", "mend_ckpt", "serac_ckpt", "serac_dir"])
def test_damaged_checkpoints_are_one_line_without_pickle_advice(tmp_path, kind, damage):
    from kedit_pl.methods.learned import read_checkpoint
    from kedit_pl.methods.serac.checkpoint import read_state

    src = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"editor.w": torch.ones(64, 64)}, "mend": {}}, src)
    if kind == "mend_safetensors":
        path = tmp_path / "editor.safetensors"
        save_tensors(path, {"w": torch.ones(64, 64)}, metadata={"mend": "{}"})
    elif kind == "serac_dir":
        path = tmp_path / "editor"
        path.mkdir()
        (path / "config.json").write_text('{"format": "kedit_pl.serac/1", "tied": {}}')
        for part in ("classifier.safetensors", "counterfactual.safetensors"):
            save_tensors(path / part, {"w": torch.ones(64, 64)})
    else:
        path = tmp_path / "editor.ckpt"
        path.write_bytes(src.read_bytes())
    damage(path / "classifier.safetensors" if kind == "serac_dir" else path)
    with pytest.raises(KEditError) as e:
        (read_state if kind.startswith("serac") else lambda p: read_checkpoint(p, "mend"))(path)
    msg = str(e.value)
    assert "method.checkpoint" in msg and str(path) in msg and "\n" not in msg
    assert "weights_only=False" not in msg and "trust" not in msg


def alter_a_digit(p):
    """Same size, still valid JSON: one digit of the cached content changes (what a parse cannot see)."""
    text = p.read_text()
    i = next(i for i, c in enumerate(text) if c.isdigit() and i > text.index('"value"'))
    p.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


JSON_DAMAGE = [truncate, noise_everywhere, alter_a_digit]


@pytest.mark.parametrize("damage", JSON_DAMAGE, ids=lambda f: f.__name__)
def test_damaged_json_cache_entries_are_named_misses(tmp_path, damage, caplog):
    from kedit_pl.io import read_json_cache, save_json_cache

    p = tmp_path / "entry.json"
    save_json_cache(p, {"nll": [0.25, 1.5], "acc": 1})
    assert read_json_cache(p, "test") == {"nll": [0.25, 1.5], "acc": 1}
    damage(p)
    with caplog.at_level(logging.WARNING):
        assert read_json_cache(p, "test cache") is None
    assert str(p) in caplog.text and "test cache" in caplog.text and not p.exists()


@pytest.mark.parametrize("damage", JSON_DAMAGE, ids=lambda f: f.__name__)
def test_damaged_pre_scores_are_named_rescored_and_equal(tiny_llama, tmp_path, damage, caplog):
    from kedit_pl.eval.pre_cache import cached_pre_scores
    from kedit_pl.eval.scoring import model_logits

    reqs = [EditRequest(case_id=str(i), subject=f"Person {i}", prompt="{} speaks", target_true="French",
                        target_new="English", paraphrases=(f"Person {i} is fluent in",),
                        neighborhood=("Someone else speaks",)) for i in range(3)]
    run = lambda: cached_pre_scores(tmp_path, model_logits(tiny_llama.model), tiny_llama.tokenizer, reqs)  # noqa: E731
    good = run()
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # beside kedit_cache.json (io.cache_root)
    bad = sorted(folder.glob("*.json"))[1]
    damage(bad)
    with caplog.at_level(logging.WARNING):
        assert run() == good
    assert str(bad) in caplog.text and "pre-edit scores" in caplog.text


def test_damaged_context_templates_are_regenerated(tiny_llama, tmp_path, caplog):
    from kedit_pl.kv import context

    args = (tiny_llama.model, tiny_llama.tokenizer, "tiny:test", [[3, 2]], 0, tmp_path)
    good = context.context_templates(*args)
    (path,) = tmp_path.glob("context_templates_*.json")
    alter_a_digit(path) if any(c.isdigit() for c in path.read_text()) else truncate(path)
    context._MEMORY.clear()
    with caplog.at_level(logging.WARNING):
        assert context.context_templates(*args) == good
    assert str(path) in caplog.text


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_null_space_projector_is_recomputed(tmp_path, damage, caplog):
    from kedit_pl.kv.nullspace import cached_null_space

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 8, generator=g, dtype=torch.float64) * torch.tensor([5, 4, 3, 2, 1, 1e-3, 1e-3, 1e-3])
    C = X.T @ X / len(X)
    args = (C, {"model": "tiny", "layer": 0}, 1e-2, "absolute", str(tmp_path), 0)
    good = cached_null_space(*args)
    (path,) = tmp_path.rglob("*.safetensors")
    damage(path)
    with caplog.at_level(logging.WARNING):
        again = cached_null_space(*args)
    assert str(path) in caplog.text and torch.equal(again.projector, good.projector) and again.kept == good.kept


def test_torn_resume_lines_are_skipped_and_named(tmp_path, caplog):
    from kedit_pl.io import read_jsonl

    p = tmp_path / "kn_facts.jsonl"
    p.write_text('{"case_id": "1"}\n{"case_id": "2"}\n{"case_id": "3", "neur')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(p, "knowledge neurons") == [{"case_id": "1"}, {"case_id": "2"}]
    assert "line 3" in caplog.text and str(p) in caplog.text
