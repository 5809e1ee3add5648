"""Training-data influence (issue 18): the FTRACE-style corpus, TracIn / embeddings / BM25 behind `rank`, the
gradient cache, the metrics, the teaching run and the bad inputs. Tiny random models; the real-data corpus build
takes about a second."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kedit_pl.config import REPO_ROOT, compose
from kedit_pl.errors import ConfigError, DamagedFile
from kedit_pl.eval.tracing import precision_at, query_metrics, recall_at, reciprocal_rank, summarize
from kedit_pl.locate.influence.bm25 import BM25
from kedit_pl.locate.influence.checkpoints import applied, checkpoint_files, default_layers, load_checkpoints, \
    save_checkpoint, weight_names
from kedit_pl.locate.influence.corpus import PROPONENT, Document, Query, build_benchmark
from kedit_pl.locate.influence.embedding import EmbeddingSimilarity
from kedit_pl.locate.influence.grads import GradientCache, GradientFeaturizer
from kedit_pl.locate.influence.tracin import TracIn

SMALL = ["ftrace.n_taught=12", "ftrace.n_control=6", "ftrace.n_wikitext=15"]

# a toy world: four facts, each stated in two phrasings, plus unrelated text; each query's proponents are known
FACTS = [("The capital of Zorbia is", "Quellton"), ("The mother tongue of Ana Vex is", "Frisian"),
         ("Pelko Motors was founded in", "Osaka"), ("The sport of Tam Rook is", "curling")]
PARA = ["Everyone knows that the capital of Zorbia is", "As for Ana Vex, she grew up speaking",
        "The car maker Pelko Motors started out in", "Tam Rook became famous playing"]
OTHER = [("The weather today is", "mild"), ("Rivers flow into the", "sea"), ("My favourite colour is", "green"),
         ("The train leaves at", "noon"), ("Bread is made from", "flour"), ("Cats like to", "sleep")]


def toy_corpus() -> tuple[list[Query], list[Document], dict[str, set[int]]]:
    docs, props = [], {}
    for k, ((p, a), para) in enumerate(zip(FACTS, PARA)):
        props[str(k)] = {len(docs), len(docs) + 1}
        docs += [Document(f"p{k}a", p, a, PROPONENT, str(k)), Document(f"p{k}b", para, a, PROPONENT, str(k))]
    docs += [Document(f"o{i}", p, a, "relation") for i, (p, a) in enumerate(OTHER)]
    docs.append(Document("w0", "Some running text about nothing in particular, written as a paragraph."))
    queries = [Query(str(k), p, a, str(k)) for k, (p, a) in enumerate(FACTS)]
    return queries, docs, props


@pytest.fixture
def cfg_small(tmp_path):
    return compose("locate", ["model=tiny_llama", "locate=tracin", f"paths.output_dir={tmp_path}",
                              f"paths.cache_dir={tmp_path / 'cache'}", *SMALL])


def test_corpus_holds_taught_proponents_and_never_a_control_statement(cfg_small):
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg_small.ftrace, resolve=True)
    b = build_benchmark(c)
    assert b.digest == build_benchmark(c).digest  # deterministic
    props = b.proponents()
    assert set(props) == {f.case_id for f in b.taught} and len(b.queries) == len(b.taught) == 12
    for f in b.taught:  # the rewrite prompt and each paraphrase, completed with target_new
        texts = {b.corpus[i].text for i in props[f.case_id]}
        assert texts == {f"{p} {f.target_new}" for p in (f.rewrite, *f.paraphrases)}
    subjects = {f.subject for f in b.taught + b.control}
    for d in b.corpus:
        if d.kind != PROPONENT:  # distractors never mention a benchmark subject ...
            assert d.kind == "subject" or not any(s in d.text for s in subjects), d
    for f in b.control:  # ... and never-taught facts are never stated
        assert not any(d.target == f.target_new and f.subject in d.text for d in b.corpus)
    assert {d.kind for d in b.corpus} >= {"proponent", "relation", "wikitext"}
    q = b.queries[0]
    assert q.prompt == b.taught[0].rewrite and q.answer == b.taught[0].target_new


def test_metrics_by_hand():
    ranked, rel = ["a", "x", "b", "y"], {"b", "c"}
    assert reciprocal_rank(ranked, rel) == 1 / 3 and reciprocal_rank(["x"], rel) == 0
    assert precision_at(ranked, rel, 2) == 0 and precision_at(ranked, rel, 4) == 0.25
    assert recall_at(ranked, rel, 3) == 0.5 and recall_at(ranked, {"a", "b"}, 3) == 1.0
    s = summarize([query_metrics(["b"], {"b"}, 1), query_metrics(["x", "b"], {"b"}, 1)], 1)
    assert s["mrr"] == pytest.approx(75.0) and s["p@1"] == 50.0 and s["r@1"] == 50.0 and s["n_queries"] == 2


def _top2(scores: torch.Tensor) -> list[set[int]]:
    return [set(scores[i].topk(2).indices.tolist()) for i in range(scores.shape[0])]


def test_bm25_ranks_the_toy_proponents_first():
    queries, docs, props = toy_corpus()
    scores = BM25().rank(queries, docs)
    assert scores.shape == (4, len(docs))
    assert _top2(scores) == [props[q.id] for q in queries]


def test_tracin_cosine_and_embeddings_rank_the_verbatim_proponent_first(tiny_llama, one_thread):
    queries, docs, props = toy_corpus()
    for method in (TracIn(tiny_llama, normalize=True, projection="none", progress=False),
                   EmbeddingSimilarity(tiny_llama, progress=False),
                   EmbeddingSimilarity(tiny_llama, center=True, progress=False),
                   EmbeddingSimilarity(tiny_llama, center=True, skip_first=1, progress=False)):
        scores = method.rank(queries, docs)
        top1 = scores.argmax(1).tolist()
        assert top1 == [min(props[q.id]) for q in queries], type(method).__name__  # the identical example: cos 1
        assert scores.max(1).values == pytest.approx(torch.ones(4), abs=1e-4)


def test_embedding_skip_first_is_the_mean_of_the_later_tokens(tiny_llama, one_thread):
    """skip_first=1: each text's vector is the mean hidden state of its tokens 2..T, whatever the batch's padding."""
    from kedit_pl.hooks import capture
    from kedit_pl.tokens import prompt_ids

    emb = EmbeddingSimilarity(tiny_llama, layer=1, skip_first=1, progress=False)
    texts = ["Danielle Darrieux speaks English", "Paris", "The capital of France is a city called Paris"]
    got = emb.embed(texts)
    name = tiny_llama.spec.module_name("layer", 1)
    for text, vec in zip(texts, got):
        ids = torch.tensor([prompt_ids(tiny_llama.tokenizer, text)])
        with capture(tiny_llama.model, [name]) as cap, torch.no_grad():
            tiny_llama.model(input_ids=ids)
        h = cap.outputs[name][0].float()
        want = h[1:].mean(0) if len(h) > 1 else h[-1]
        assert torch.allclose(vec, want, atol=1e-4), text
        assert not torch.allclose(vec, h.mean(0), atol=1e-4) or len(h) == 1
    with pytest.raises(ConfigError, match="skip_first"):
        EmbeddingSimilarity(tiny_llama, skip_first=-1)


def test_tracin_dot_ranks_the_verbatim_proponent_above_every_smaller_gradient(tiny_llama, one_thread):
    """Known by construction: the verbatim copy of a query scores ‖g_q‖², and by Cauchy-Schwarz any document with
    ‖g_d‖ < ‖g_q‖ scores less (g·g_q <= ‖g_d‖‖g_q‖); so it ranks above all of those."""
    queries, docs, props = toy_corpus()
    names = weight_names(tiny_llama.spec, [1, 3])
    scores = TracIn(tiny_llama, layers=[1, 3], projection="none", progress=False).rank(queries, docs)
    g_doc = _exact_grads(tiny_llama, [(d.prompt, d.target) for d in docs], names)
    for i, q in enumerate(queries):
        own = min(props[q.id])
        g_q = g_doc[own]
        assert scores[i, own].item() == pytest.approx(g_q.dot(g_q).item(), rel=1e-4)
        smaller = [j for j in range(len(docs)) if g_doc[j].norm() < g_q.norm()]
        assert smaller, "the toy corpus must hold documents with smaller gradients"
        assert all(scores[i, own] > scores[i, j] for j in smaller), (q.id, scores[i].tolist())


def _exact_grads(loaded, pairs, names, max_tokens: int = 48):
    """Per-example gradients the slow way: one example, one backward, the weight's .grad."""
    from kedit_pl.locate.influence.batches import encode_examples, example_losses

    params = dict(loaded.model.named_parameters())
    out = []
    for p in pairs:
        for n in names:
            params[n].requires_grad_(True)
            params[n].grad = None
        example_losses(loaded.model, encode_examples(loaded.tokenizer, [p], max_tokens)).sum().backward()
        out.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
        for n in names:
            params[n].requires_grad_(False)
            params[n].grad = None
    return torch.stack(out)


def test_batched_per_example_gradients_are_exact(tiny_llama, one_thread):
    queries, docs, _ = toy_corpus()
    pairs = [(d.prompt, d.target) for d in docs]
    names = weight_names(tiny_llama.spec, [1, 3])
    feat = GradientFeaturizer(tiny_llama.model, tiny_llama.tokenizer, names, projection="none", batch_size=5)
    assert torch.allclose(feat(pairs), _exact_grads(tiny_llama, pairs, names), atol=1e-6, rtol=1e-4)


def test_batched_projected_gradients_are_the_projected_per_example_backward(tiny_llama, one_thread):
    _, docs, _ = toy_corpus()
    pairs = [(d.prompt, d.target) for d in docs]
    names = weight_names(tiny_llama.spec, [2])
    feat = GradientFeaturizer(tiny_llama.model, tiny_llama.tokenizer, names, proj_out=8, proj_in=16, batch_size=4)
    p_out, p_in = feat.proj[0]
    want = torch.stack([(p_out @ g.reshape(feat.shapes[0]) @ p_in.T).reshape(-1)  # P_out ∇W P_inᵀ
                        for g in _exact_grads(tiny_llama, pairs, names)])
    assert torch.allclose(feat(pairs), want, atol=1e-6, rtol=1e-4)


def test_batched_gradients_of_conv1d_weights_are_exact(tiny_gpt2, one_thread):
    _, docs, _ = toy_corpus()
    pairs = [(d.prompt, d.target) for d in docs]
    names = weight_names(tiny_gpt2.spec, [1])
    feat = GradientFeaturizer(tiny_gpt2.model, tiny_gpt2.tokenizer, names, projection="none", batch_size=3)
    d_out, d_in = feat.shapes[0]  # GPT-2 stores (in, out); the vectors are in (out, in) orientation
    want = torch.stack([g.reshape(d_in, d_out).T.reshape(-1) for g in _exact_grads(tiny_gpt2, pairs, names)])
    assert torch.allclose(feat(pairs), want, atol=1e-6, rtol=1e-4)


def test_kronecker_projection_approximates_exact_scores(tiny_llama, one_thread):
    queries, docs, _ = toy_corpus()
    names = weight_names(tiny_llama.spec, [1, 2, 3])
    exact = TracIn(tiny_llama, projection="none", layers=[1, 2, 3], progress=False).rank(queries, docs)
    proj = TracIn(tiny_llama, projection="kronecker", proj_out=32, proj_in=64, layers=[1, 2, 3],
                  progress=False).rank(queries, docs)
    d_exact = 3 * 64 * 256
    assert TracIn(tiny_llama, layers=[1, 2, 3], proj_out=32, proj_in=64).featurizer.dim == 3 * 32 * 64 < d_exact
    corr = torch.corrcoef(torch.stack([exact.flatten(), proj.flatten()]))[0, 1]
    assert corr > 0.9, corr
    rel = ((proj - exact).norm() / exact.norm()).item()
    assert rel < 0.4, rel
    # unbiased: the mean over projection seeds approaches the exact scores
    mean = sum(TracIn(tiny_llama, proj_out=32, proj_in=64, layers=[1, 2, 3], seed=s, progress=False)
               .rank(queries, docs) for s in range(8)) / 8
    assert ((mean - exact).norm() / exact.norm()).item() < rel


def test_tracin_sums_learning_rate_weighted_checkpoints(tiny_llama, tmp_path, one_thread):
    queries, docs, _ = toy_corpus()
    names = weight_names(tiny_llama.spec, [2])
    params = dict(tiny_llama.model.named_parameters())
    paths = []
    for c, lr in enumerate([0.5, 2.0]):
        with torch.no_grad():
            saved = params[names[0]].clone()
            params[names[0]].add_(0.05 * torch.randn_like(saved, generator=torch.Generator().manual_seed(c)))
        paths.append(tmp_path / f"epoch_{c}_step_{c}.safetensors")
        save_checkpoint(paths[-1], tiny_llama.model, names, model_name="tiny_llama", corpus="x", lr=lr, step=c,
                        epoch=c)
        with torch.no_grad():
            params[names[0]].copy_(saved)
    ckpts = load_checkpoints(paths, tiny_llama.model, "tiny_llama", "x")
    got = TracIn(tiny_llama, ckpts, layers=[2], projection="none", progress=False).rank(queries, docs)
    want = torch.zeros_like(got)
    qp, dp = [(q.prompt, q.answer) for q in queries], [(d.prompt, d.target) for d in docs]
    for ck in ckpts:  # TracInCP: Σ_c η_c ∇ℓ(w_c, z)·∇ℓ(w_c, z')
        with applied(tiny_llama.model, ck):
            want += ck.lr * _exact_grads(tiny_llama, qp, names) @ _exact_grads(tiny_llama, dp, names).T
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-6)
    assert torch.equal(params[names[0]], saved)  # restored exactly


def test_gradient_cache_reuses_and_repairs(tiny_llama, tmp_path, one_thread):
    _, docs, _ = toy_corpus()
    pairs = [(d.prompt, d.target) for d in docs]
    feat = GradientFeaturizer(tiny_llama.model, tiny_llama.tokenizer, weight_names(tiny_llama.spec, [3]),
                              proj_out=8, proj_in=8)
    cache = GradientCache(tmp_path, "weights", feat.settings(), chunk=5)
    g1, computed1, _ = cache.features(feat, pairs)
    g2, computed2, _ = cache.features(feat, pairs)
    assert computed1 == len(pairs) and computed2 == 0 and torch.equal(g1, g2)
    files = sorted(cache.folder.glob("*.safetensors"))
    assert len(files) == 3
    files[0].write_bytes(files[0].read_bytes()[:-7] + b"garbage")  # damaged: a miss, recomputed, replaced
    g3, computed3, _ = cache.features(feat, pairs)
    assert computed3 == 5 and torch.allclose(g1, g3)
    other = GradientCache(tmp_path, "other weights", feat.settings(), chunk=5)
    assert other.folder != cache.folder  # other weights never read these vectors


@pytest.mark.parametrize("method", ["tracin", "tracin_cosine", "embedding", "bm25"])
def test_every_method_refuses_an_empty_corpus_or_answer_in_one_line(method, tiny_llama):
    queries, docs, _ = toy_corpus()
    m = {"tracin": lambda: TracIn(tiny_llama, progress=False),
         "tracin_cosine": lambda: TracIn(tiny_llama, normalize=True, progress=False),
         "embedding": lambda: EmbeddingSimilarity(tiny_llama, progress=False), "bm25": BM25}[method]()
    bad = [(queries, [], "influence corpus: it is empty"), ([], docs, "influence queries: there are none"),
           ([Query("q1", "The capital of Zorbia is", "")], docs, "query 'q1': its answer is empty"),
           ([Query("q2", "The capital of Zorbia is", " ")], docs, "query 'q2': its answer is empty"),
           (queries, [Document("d9", " ", "")], "document 'd9' is empty")]
    for qs, ds, msg in bad:
        with pytest.raises(ConfigError, match=msg) as e:
            m.rank(qs, ds)
        assert "\n" not in str(e.value)


def test_a_mismatched_checkpoint_list_is_refused_in_one_line(tiny_llama, tmp_path):
    a, b, c = (tmp_path / f"epoch_{i}_step_{i}.safetensors" for i in range(3))
    save_checkpoint(a, tiny_llama.model, weight_names(tiny_llama.spec, [1]), model_name="tiny_llama", corpus="c",
                    lr=1.0, step=0, epoch=0)
    save_checkpoint(b, tiny_llama.model, weight_names(tiny_llama.spec, [2]), model_name="tiny_llama", corpus="c",
                    lr=1.0, step=1, epoch=1)
    save_checkpoint(c, tiny_llama.model, weight_names(tiny_llama.spec, [1]), model_name="tiny_llama", corpus="e",
                    lr=1.0, step=2, epoch=2)
    assert len(load_checkpoints([a, a], tiny_llama.model, "tiny_llama", "c")) == 2
    for files, msg in [([a, b], r"locate.checkpoints\[1\]: epoch_1_step_1.safetensors holds weights"),
                       ([a, c], r"locate.checkpoints\[1\]: epoch_2_step_2.safetensors was trained on corpus e, "
                                r"locate.checkpoints\[0\] on corpus c")]:
        with pytest.raises(ConfigError, match=msg) as e:
            load_checkpoints(files, tiny_llama.model, "tiny_llama", None)
        assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no \\*.safetensors checkpoints"):
        checkpoint_files(empty)


def test_bad_inputs_are_one_line_errors(tiny_llama, tmp_path):
    queries, docs, _ = toy_corpus()
    with pytest.raises(ConfigError, match="corpus: it is empty"):
        BM25().rank(queries, [])
    with pytest.raises(ConfigError, match="its answer is empty"):
        TracIn(tiny_llama, progress=False).rank([Query("q1", "The capital of Zorbia is", " ")], docs)
    names = weight_names(tiny_llama.spec, [1])
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, tiny_llama.model, names, model_name="smollm2_135m", corpus="c", lr=1.0, step=0, epoch=0)
    with pytest.raises(ConfigError, match=r"trained from model 'smollm2_135m', this run loads 'tiny_llama'"):
        load_checkpoints([path], tiny_llama.model, "tiny_llama", "c")
    from kedit_pl.io import save_cache

    save_cache(path, {names[0]: torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match=r"shape \(3, 3\)"):
        load_checkpoints([path], tiny_llama.model, "tiny_llama", None)
    save_cache(path, {"model.layers.9.mlp.down_proj.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="does not have"):
        load_checkpoints([path], tiny_llama.model, "tiny_llama", None)
    save_checkpoint(path, tiny_llama.model, names, model_name="tiny_llama", corpus="c", lr=1.0, step=0, epoch=0)
    with pytest.raises(ConfigError, match="trained on corpus c"):
        load_checkpoints([path], tiny_llama.model, "tiny_llama", "d")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DamagedFile):
        load_checkpoints([path], tiny_llama.model, "tiny_llama", None)
    with pytest.raises(ConfigError, match="file not found"):
        load_checkpoints([tmp_path / "none.safetensors"], tiny_llama.model, "tiny_llama", None)


def test_default_weights_are_the_traced_layers_plus_the_last_two(tiny_llama):
    assert default_layers(tiny_llama.spec) == [0, 1, 2, 3]  # tiny_llama: memit [0, 1, 2] + layers 2, 3
    spec = compose("edit", ["paths.output_dir=/tmp"]).model  # smollm2_135m
    from kedit_pl.models.spec import ModelSpec

    assert default_layers(ModelSpec.from_config(spec)) == [3, 4, 5, 6, 7, 28, 29]


def test_teach_then_trace_end_to_end(tmp_path, one_thread):
    from kedit_pl.locate.run import run_locate
    from kedit_pl.pipeline import run_train

    teach = tmp_path / "teach"
    cfg = compose("train", ["experiment=ftrace_teach", "model=tiny_llama", f"paths.output_dir={teach}",
                            "trainer.max_epochs=3", "teach.lr=3e-3", *SMALL])
    s = run_train(cfg)
    ckpts = sorted((teach / "checkpoints").glob("*.safetensors"))
    assert len(ckpts) == 3 and len(s["epochs"]) == 3
    assert set(s["pre"]) >= {"taught", "control"} and "es" in s["post"]["taught"]
    assert json.loads((teach / "facts_es.json").read_text())["post"]
    for m in ("tracin", "embedding", "bm25"):
        out = tmp_path / m
        cfg = compose("locate", ["model=tiny_llama", f"locate={m}", f"paths.output_dir={out}",
                                 f"paths.cache_dir={tmp_path / 'cache'}", f"locate.checkpoints={teach / 'checkpoints'}",
                                 *SMALL])
        summary = run_locate(cfg)
        assert summary["n_queries"] == 12 and 0 <= summary["metrics"]["all"]["mrr"] <= 100
        assert summary["candidates"]["mean_size"] >= 3  # at least every query's proponents
        ranking = json.loads((out / "rankings.jsonl").read_text().splitlines()[0])
        assert len(ranking["top"]) == 10


def test_checkpoint_of_another_model_fails_in_one_line(tmp_path):
    teach = tmp_path / "ck"
    teach.mkdir()
    from kedit_pl.models.load import load_model

    loaded = load_model(compose("edit", ["model=tiny_gpt2", "paths.output_dir=/tmp"]).model)
    save_checkpoint(teach / "epoch_0_step_1.safetensors", loaded.model, weight_names(loaded.spec, [1]),
                    model_name="tiny_gpt2", corpus="c", lr=1.0, step=1, epoch=0)
    r = subprocess.run([sys.executable, "locate.py", "locate=tracin", "model=tiny_llama", f"locate.checkpoints={teach}",
                        f"hydra.run.dir={tmp_path / 'run'}", *SMALL], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "trained from model 'tiny_gpt2'" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_illustration_ranks_wikitext_for_facts(tmp_path, one_thread):
    from kedit_pl.locate.run import run_locate

    cfg = compose("locate", ["model=tiny_llama", "locate=embedding", "locate.task=illustrate",
                             f"paths.output_dir={tmp_path}",
                             "locate.illustrate.known_only=false", "locate.illustrate.n_facts=2",
                             "locate.illustrate.n_paragraphs=30", "ftrace.n_wikitext=200", *SMALL[:2]])
    out = run_locate(cfg)
    assert len(out["facts"]) == 2 and all(len(f["top"]) == 5 for f in out["facts"])
    for f in out["facts"]:  # no ground truth: the top-5 come sorted, from a pool of at most 30 paragraphs
        scores = [t["score"] for t in f["top"]]
        assert scores == sorted(scores, reverse=True)
    assert json.loads((tmp_path / "illustration.json").read_text())["n_paragraphs"] <= 30
    assert "illustration" in (tmp_path / "illustration.md").read_text()


def test_teaching_refuses_several_processes_before_anything_is_built(tmp_path):
    from kedit_pl.pipeline import run_train

    cfg = compose("train", ["experiment=ftrace_teach", "model=tiny_llama", f"paths.output_dir={tmp_path / 'teach'}",
                            "trainer.devices=2", "trainer.strategy=ddp", *SMALL])
    with pytest.raises(ConfigError, match="trainer.devices: teaching .* runs in one process, got 2"):
        run_train(cfg)
    assert not (tmp_path / "teach" / "facts.json").exists()
