"""Teaching the benchmark's facts: fine-tune the model on the FTRACE-style corpus (`python train.py
experiment=ftrace_teach`), so that the taught facts have known proponents.

`CorpusTeacher` is a LightningModule training only the chosen projections (`teach.layers`, default: the layers
causal tracing marks plus the last two, the same weights TracIn looks at) with Adam at a constant learning rate on
each document's loss (cloze documents: their answer tokens; running text: every token). After every epoch the
trained weights are saved as a checkpoint for TracIn (`<run>/checkpoints/epoch_<k>_step_<s>.safetensors`) and the
efficacy (ES: P(target_new) > P(target_true) after the rewrite prompt) of the taught and never-taught facts is
measured; before training, the unedited values. Training stops once `teach.min_epochs` are done and the taught ES
reaches `teach.stop_es` (or at `trainer.max_epochs`).
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.locate.influence.batches import encode_examples, example_losses, token_lengths
from kedit_pl.locate.influence.checkpoints import save_checkpoint, weight_names
from kedit_pl.locate.influence.corpus import Benchmark, Document

log = logging.getLogger("kedit_pl.teach")


class CorpusTeacher(L.LightningModule):
    """Fine-tunes `names` (parameter names) of `model` on documents; everything else stays frozen."""

    def __init__(self, model, names: list[str], lr: float) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigError(f"teach.lr: must be > 0, got {lr}")
        self.model, self.names, self.lr = model, list(names), float(lr)
        params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        for n in self.names:
            params[n].requires_grad_(True)
        self.model.eval()  # no dropout: the gradients TracIn takes later are of this same function

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = example_losses(self.model, batch).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self):
        params = dict(self.model.named_parameters())
        return torch.optim.Adam([params[n] for n in self.names], lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{n}" for n in self.names}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        state.update({f"model.{k}": v for k, v in self.model.state_dict().items() if f"model.{k}" not in state})


class CorpusData(L.LightningDataModule):
    """Documents in shuffled batches of similar length (a fresh seeded shuffle every epoch)."""

    def __init__(self, docs: list[Document], tok, batch_size: int, max_tokens: int, seed: int) -> None:
        super().__init__()
        self.docs, self.tok, self.batch_size, self.max_tokens, self.seed = docs, tok, batch_size, max_tokens, seed
        self.pairs = [(d.prompt, d.target) for d in docs]
        self.lengths = token_lengths(tok, self.pairs, max_tokens)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            _Batches(self), batch_size=None, shuffle=False, num_workers=0)


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, dm: CorpusData) -> None:
        self.dm, self.epoch = dm, 0

    def __len__(self) -> int:
        return -(-len(self.dm.docs) // self.dm.batch_size)

    def __iter__(self):
        dm = self.dm
        rng = random.Random(dm.seed * 1000 + self.epoch)
        self.epoch += 1
        order = list(range(len(dm.docs)))
        rng.shuffle(order)
        pool = dm.batch_size * 16  # sort within pools of 16 batches: little padding, still shuffled
        batches = []
        for s in range(0, len(order), pool):
            chunk = sorted(order[s:s + pool], key=lambda i: dm.lengths[i])
            batches += [chunk[k:k + dm.batch_size] for k in range(0, len(chunk), dm.batch_size)]
        rng.shuffle(batches)
        for b in batches:
            yield encode_examples(dm.tok, [dm.pairs[i] for i in b], dm.max_tokens)


@torch.no_grad()
def fact_efficacy(model, tok, facts: list[EditRequest], paraphrases: bool) -> tuple[dict[str, float], dict[str, bool]]:
    """ES (and PS) in percent over `facts`, and each fact's rewrite-prompt success."""
    from kedit_pl.eval.metrics import summarize
    from kedit_pl.eval.scoring import model_logits, score_requests

    reqs = [replace(f, neighborhood=(), paraphrases=f.paraphrases if paraphrases else ()) for f in facts]
    was = model.training
    model.eval()
    records = score_requests(model_logits(model), tok, reqs)
    model.train(was)
    ok = {r["case_id"]: r["rewrite"]["new"][0]["nll"] < r["rewrite"]["true"][0]["nll"] for r in records}
    s = summarize(records)
    return {k: s[k] for k in ("es", "ps") if k in s}, ok


class TeachCallback(L.Callback):
    """Pre-training efficacy, then per epoch: a TracIn checkpoint, efficacy, and the stopping rule."""

    def __init__(self, out: Path, bench: Benchmark, tok, model_name: str, tc: DictConfig, resumed: bool) -> None:
        self.out, self.bench, self.tok, self.model_name, self.tc = out, bench, tok, model_name, tc
        self.path = out / "teach_progress.json"
        from kedit_pl.io import read_json

        self.progress: dict[str, Any] = read_json(self.path) if resumed and self.path.is_file() else {"epochs": []}

    def _eval(self, model, paraphrases: bool) -> dict[str, Any]:
        t = time.perf_counter()
        taught, ok_t = fact_efficacy(model, self.tok, self.bench.taught, paraphrases)
        control, ok_c = fact_efficacy(model, self.tok, self.bench.control, paraphrases)
        return {"taught": taught, "control": control, "ok": {**ok_t, **ok_c}, "seconds": time.perf_counter() - t}

    def _save(self) -> None:
        from kedit_pl.io import write_json

        write_json(self.path, self.progress)

    def on_fit_start(self, trainer, pl_module: CorpusTeacher) -> None:
        if "pre" not in self.progress:
            self.progress["pre"] = self._eval(pl_module.model, paraphrases=True)
            self._save()
        p = self.progress["pre"]
        log.info("unedited: taught ES %.1f PS %.1f, never-taught ES %.1f PS %.1f", p["taught"]["es"],
                 p["taught"].get("ps", float("nan")), p["control"]["es"], p["control"].get("ps", float("nan")))

    def on_train_epoch_end(self, trainer, pl_module: CorpusTeacher) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        path = self.out / "checkpoints" / f"epoch_{epoch}_step_{step}.safetensors"
        save_checkpoint(path, pl_module.model, pl_module.names, model_name=self.model_name,
                        corpus=self.bench.digest, lr=pl_module.lr, step=step, epoch=epoch)
        last = epoch + 1 >= (trainer.max_epochs or 0)
        res = self._eval(pl_module.model, paraphrases=last)
        res.update(epoch=epoch, step=step, checkpoint=str(path))
        self.progress["epochs"] = [e for e in self.progress["epochs"] if e["epoch"] != epoch] + [res]
        self._save()
        pl_module.log_dict({"val/taught_es": res["taught"]["es"], "val/control_es": res["control"]["es"]})
        log.info("epoch %d (step %d): taught ES %.1f, never-taught ES %.1f; checkpoint %s", epoch, step,
                 res["taught"]["es"], res["control"]["es"], path.name)
        if epoch + 1 >= int(self.tc.min_epochs) and res["taught"]["es"] >= float(self.tc.stop_es):
            log.info("taught ES %.1f >= teach.stop_es %.1f after %d epochs: stopping", res["taught"]["es"],
                     float(self.tc.stop_es), epoch + 1)
            trainer.should_stop = True


def run_teach(cfg: DictConfig) -> dict[str, Any]:
    """train.py with a `teach` node: build the corpus, fine-tune, write checkpoints and teach_summary.json."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kedit_pl.io import write_json
    from kedit_pl.locate.influence.corpus import build_benchmark, write_benchmark
    from kedit_pl.models.load import load_model
    from kedit_pl.runtime import build_loggers, build_trainer, finish_loggers, output_dir

    from kedit_pl.distributed import requested_devices

    if requested_devices(cfg.trainer) != 1:
        raise ConfigError(f"trainer.devices: teaching (experiment=ftrace_teach) runs in one process, got "
                          f"{cfg.trainer.get('devices')!r}; use trainer.devices=1")
    tc, out = cfg.teach, output_dir(cfg)
    if int(tc.batch_size) < 1 or int(tc.max_tokens) < 2 or int(tc.min_epochs) < 1:
        raise ConfigError(f"teach.batch_size/max_tokens/min_epochs: need >= 1/2/1, got {tc.batch_size}/"
                          f"{tc.max_tokens}/{tc.min_epochs}")
    bench = build_benchmark(OmegaConf.to_container(cfg.ftrace, resolve=True))
    write_benchmark(bench, out)
    L.seed_everything(cfg.seed, verbose=False)
    loaded = load_model(cfg.model)
    names = weight_names(loaded.spec, tc.layers, list(tc.modules))
    module = CorpusTeacher(loaded.model, names, tc.lr)
    dm = CorpusData(bench.corpus, loaded.tokenizer, int(tc.batch_size), int(tc.max_tokens), int(cfg.seed))
    last = out / "checkpoints" / "lightning" / "last.ckpt"
    resumed = bool(cfg.train.get("resume")) and last.is_file()
    cb = TeachCallback(out, bench, loaded.tokenizer, cfg.model.name, tc, resumed)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints" / "lightning", save_last=True, save_top_k=0,
                           every_n_epochs=1)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, [cb, ckpt], loggers)
    log.info("teaching %s: %d documents (%d tokens), %d taught / %d never-taught facts, weights %s",
             cfg.model.name, len(bench.corpus), sum(dm.lengths), len(bench.taught), len(bench.control), names)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resumed else None)
    seconds = time.perf_counter() - start
    finish_loggers(loggers)
    return summarize_run(out, seconds)


def summarize_run(out: Path, train_seconds: float | None = None) -> dict[str, Any]:
    """teach_summary.json and facts_es.json (each fact's rewrite success before and after) of a teaching run, from
    its teach_progress.json and checkpoints; also for a run stopped between epochs
    (`python -m kedit_pl.locate.influence.teach RUN_DIR`)."""
    from kedit_pl.io import read_json, read_tensors, write_json
    from kedit_pl.locate.influence.checkpoints import META_KEY

    prog, facts = read_json(out / "teach_progress.json"), read_json(out / "facts.json")
    if not prog.get("epochs"):
        raise ConfigError(f"{out}: no finished epoch in teach_progress.json; nothing to summarize")
    final = prog["epochs"][-1]
    tensors, meta = read_tensors(final["checkpoint"], "teaching checkpoint")
    info = json.loads(meta.get(META_KEY, "{}"))
    summary = {"corpus": facts["stats"] | {"digest": facts["digest"]}, "weights": sorted(tensors),
               "lr": info.get("lr"), "pre": _strip(prog.get("pre")), "post": _strip(final),
               "epochs": [_strip(e) for e in prog["epochs"]], "checkpoints": [e["checkpoint"] for e in prog["epochs"]],
               "train_seconds": train_seconds}
    write_json(out / "teach_summary.json", summary)
    write_json(out / "facts_es.json", {"pre": prog["pre"]["ok"], "post": final["ok"]})
    log.info("taught ES %.1f -> %.1f, never-taught ES %.1f -> %.1f after %d epochs; checkpoints in %s",
             prog["pre"]["taught"]["es"], final["taught"]["es"], prog["pre"]["control"]["es"],
             final["control"]["es"], len(prog["epochs"]), out / "checkpoints")
    return summary


def _strip(res: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if res is None else {k: v for k, v in res.items() if k != "ok"}


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summarize_run(Path(sys.argv[1]))
