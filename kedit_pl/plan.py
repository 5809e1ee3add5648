"""The memory plan of a run, from the config alone (no weights loaded): weights, key statistics, method state and
evaluation on the chosen device, its peak, and a one-line refusal when the peak exceeds the device's free memory.

Sizes come from the architecture built on the meta device (`model.config` in the model YAML, models/sizes.py), so
the plan of an 8B model needs neither its weights nor the hub. Every term is a count of the tensors the code holds,
times their element size; activations are estimated per token and layer. The estimate was checked against measured
peaks (docs/gpu.md).

    peak = runtime + weights + max(loading, statistics held + weight copies + max(statistics pass, method, evaluation))
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kedit_pl.devices import free_bytes, run_device
from kedit_pl.errors import ConfigError
from kedit_pl.models.sizes import meta_model
from kedit_pl.models.spec import ModelSpec, linear_weight

log = logging.getLogger(__name__)

GB = 2**30
_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
#: what a process holds before the model: Python, torch, transformers, Lightning, Hydra, the records (edit.py up to
#: the load measured 0.46 GiB peak RSS, docs/gpu.md); on CUDA the context and kernels (outside PyTorch's allocator)
RUNTIME = {"cpu": int(0.5 * GB), "cuda": int(0.6 * GB)}
#: elements one decoder layer keeps per token for the backward pass: norms, q/k/v/o (≈ 8 d) and the MLP's
#: projections and activation (≈ 4 d_ff)
ACT_D, ACT_FF = 8, 4
#: the value optimization's rows: tokens past the subject (suffix + target) and before it (the cached prefix)
SUFFIX_TOKENS, PREFIX_TOKENS, TARGET_TOKENS = 8, 20, 3
#: evaluation: positions whose logits a scored prompt keeps (the target's tokens), and prompt length
EVAL_KEEP, EVAL_TOKENS = 4, 24
#: a training batch of a learned editor: prompts per record (edit, paraphrase, locality) and tokens per prompt
TRAIN_PROMPTS, TRAIN_TOKENS = 3, 24
LOCATE_EDIT = ("rome", "r_rome", "memit", "emmet", "alphaedit")
LEARNED = ("mend", "ke", "serac")


@dataclass
class MemoryPlan:
    """Bytes per part of a run; `peak` combines them as the module docstring says."""

    label: str
    device: str
    runtime: int
    weights: int
    stats_held: int = 0
    stats_pass: int = 0
    copies: int = 0  # held for the run besides the weights: the value optimization's low-precision weight copies
    load: int = 0  # while loading only: a float32 checkpoint read while the weights are cast to model.dtype
    method: int = 0
    evaluation: int = 0
    free: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Estimated peak bytes: runtime + weights + the largest of loading and what is held while editing."""
        return self.runtime + self.weights + max(self.load, self.stats_held + self.copies +
                                                 max(self.stats_pass, self.method, self.evaluation))

    def table(self) -> str:
        """The plan as printed before loading: one line per part, then the peak and the device's free memory."""
        rows = [("weights", self.weights), ("loading (transient)", self.load),
                ("key statistics (held)", self.stats_held),
                ("key statistics (pass, transient)", self.stats_pass),
                ("weight copies (compute_dtype)", self.copies), ("method state", self.method),
                ("evaluation", self.evaluation), ("runtime (libraries, context)", self.runtime)]
        free = "unknown" if self.free is None else f"{self.free / GB:.2f} GiB"
        lines = [f"memory plan: {self.label} on {self.device}"]
        lines += [f"  {name:<34}{n / GB:8.2f} GiB" for name, n in rows]
        lines += [f"  {'estimated peak':<34}{self.peak / GB:8.2f} GiB  (free on {self.device}: {free})"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def refusal(self) -> str | None:
        """One line when the peak does not fit in the free memory; None when it does (or the free memory is unknown)."""
        if self.free is None or self.peak <= self.free:
            return None
        return (f"memory plan: {self.label} needs about {self.peak / GB:.1f} GiB at its peak but {self.device} has "
                f"{self.free / GB:.1f} GiB free; use model.dtype=bfloat16, a smaller edit.batch_size / "
                f"method.z_batch_size / edit.eval_batch_size, or a larger device (edit.dry_run=true prints the plan)")


def plan_memory(cfg: DictConfig, task: str = "edit") -> MemoryPlan:
    """The plan of `cfg` (an edit.py or train.py config) on trainer.accelerator's device."""
    mc = OmegaConf.to_container(cfg.model, resolve=True)
    meth = OmegaConf.to_container(cfg.method, resolve=True)
    name = str(meth.get("name"))
    device = run_device(cfg.trainer.get("accelerator", "cpu"))
    dtype = str(mc.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in _BYTES:
        raise ConfigError(f"model.dtype: unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    wb = _BYTES[dtype]
    model = meta_model(mc)
    spec = ModelSpec.from_config(mc)
    n_params = sum(p.numel() for p in model.parameters())
    conf = model.config
    d, vocab, n_layers = spec.hidden_size, int(conf.vocab_size), spec.n_layers
    d_out, d_k = linear_weight(spec.module(model, "mlp_out", 0)).shape  # (out, in): d_k = d_ff
    kv_dim = _kv_dim(conf, d)
    act_layer = ACT_D * d + ACT_FF * d_k  # elements per token and layer
    if task == "train":
        batch = int(cfg.train.batch_size)
        label = f"{mc['name']} ({dtype}) x {name} training, batch {batch}"
    else:
        batch = 1 if cfg.edit.mode == "single" else int(cfg.edit.batch_size)
        label = f"{mc['name']} ({dtype}) x {name}, batch {batch}"
    plan = MemoryPlan(label=label, device=str(device), runtime=RUNTIME.get(device.type, RUNTIME["cpu"]),
                      weights=n_params * wb)
    if device.type == "cpu" and mc.get("source") == "gguf" and wb != 4:  # the float32 cache, mapped while cast
        plan.load = n_params * 4

    # evaluation: per forward, eval_batch_size prompts; logits of the kept positions and their float32 log-softmax
    rows = int(cfg.edit.get("eval_batch_size", 64)) if task == "edit" else 64
    plan.evaluation = rows * EVAL_KEEP * vocab * (wb + 4 + 4) + rows * EVAL_TOKENS * n_layers * 2 * kv_dim * wb \
        + rows * EVAL_TOKENS * act_layer * wb

    if name in LOCATE_EDIT:
        _locate_edit(plan, cfg, meth, name, batch, d, d_k, vocab, n_layers, act_layer, kv_dim, wb)
        if str(meth.get("compute_dtype", "float32")) != "float32" and wb == 4:  # kv/precision.py: the blocks above
            top = max(meth.get("layers") or [meth.get("layer")])  # the edit layer and the head, copied in bf16
            upper = sum(p.numel() for i in range(top + 1, n_layers) for p in spec.module(model, "layer", i).parameters())
            plan.copies = (upper + model.get_output_embeddings().weight.numel()) * 2
    elif name in ("ft", "ft_l"):
        n_edit = len(meth.get("layers") or []) * len(meth.get("modules") or ["mlp_out"]) * d_out * d_k
        master = 4 if wb < 4 else 0  # float32 master copies of half-precision weights (methods/ft.py)
        plan.method = n_edit * (wb + 4 + 4 + master + wb) + _graph(batch, TRAIN_TOKENS, n_layers, act_layer, vocab, wb)
    elif name in ("mend", "ke"):
        n_mod = len(meth.get("layers") or []) * len(meth.get("modules") or ["mlp_in", "mlp_out"])
        grads = n_mod * d_out * d_k * (wb + 4)  # the edited weights' gradients, and the update in float32
        graph = _graph(batch * TRAIN_PROMPTS, TRAIN_TOKENS, n_layers, act_layer, vocab, wb)
        graph += batch * TRAIN_TOKENS * vocab * 4  # the unedited model's locality distribution (the KL's target)
        editor = _mend_params(meth, d, d_k) if name == "mend" else _ke_params(meth, d, d_k, n_mod)
        # training: the editor's float32 parameters, gradients and Adam's two moments; editing: parameters only
        plan.method = editor * 4 * (4 if task == "train" else 1) + grads + graph
        if task == "train":
            plan.notes.append(f"{name} editor: {editor / 1e6:.0f}M parameters (float32), Adam state included")
    elif name == "serac":
        # a counterfactual copy of the base model (trained in float32 when training) and the scope encoder
        plan.method = n_params * (wb if task == "edit" else 16) + _graph(batch * TRAIN_PROMPTS, TRAIN_TOKENS,
                                                                         n_layers, act_layer, vocab, wb)
    elif name == "kn":
        steps, rows_kn = int(meth.get("steps", 20)), int(meth.get("batch_rows", 200))
        plan.method = _graph(min(rows_kn, steps * n_layers), EVAL_TOKENS, n_layers, act_layer, vocab, wb)
    plan.free = free_bytes(device)
    return plan


def _locate_edit(plan: MemoryPlan, cfg, meth: dict, name: str, batch: int, d: int, d_k: int, vocab: int,
                 n_layers: int, act_layer: int, kv_dim: int, wb: int) -> None:
    """ROME, r-ROME, MEMIT, EMMET, AlphaEdit: statistics, the value optimization and the float64 algebra."""
    layers = list(meth.get("layers") or [meth.get("layer")])
    n_l = len(layers)
    loss_layer = meth.get("loss_layer")
    loss_layer = n_layers - 1 if loss_layer is None else int(loss_layer)
    sb = _BYTES[str(cfg.stats.get("dtype", "float64"))]
    mat64 = d_k * d_k * 8
    if meth.get("mom2_adjustment", True):
        if name in ("rome", "r_rome"):
            plan.stats_held = mat64  # the Cholesky factor of C (C itself is dropped once factored)
            algebra = d_k * d_k * sb + 3 * mat64  # C, its float64 copy, the symmetrized copy, the factor
        else:
            plan.stats_held = n_l * d_k * d_k * sb  # C₀ per layer of the range
            algebra = 3 * mat64  # λC₀ + KKᵀ, its symmetrized copy, its factor
            if name == "emmet":
                plan.stats_held += n_l * mat64  # one Cholesky factor per layer, kept
            if name == "alphaedit":
                plan.stats_held += 2 * n_l * mat64  # P and K_pK_pᵀ per layer
                algebra = max(algebra, 4 * mat64)  # eigendecomposition of C₀ for P
        tokens = int(cfg.stats.batch_size) * int(cfg.stats.seq_len)
        plan.stats_pass = tokens * (act_layer * wb + n_l * d_k * (wb + sb)) + d_k * d_k * sb  # + one kᵀk
        plan.notes.append("the statistics pass counts only when E[kkᵀ] is not cached yet (stats.cache_dir)")
    else:
        algebra = 3 * mat64
    n_templates = 1 + sum(int(c) for _, c in meth.get("context_template_length_params") or [[5, 10], [10, 10]])
    group = 1 if name in ("rome", "r_rome") else min(batch, int(meth.get("z_batch_size", 32)))
    rows = group * (n_templates + 1)  # + the KL prompt
    upper = loss_layer - max(layers) + 1
    values = rows * SUFFIX_TOKENS * upper * act_layer * wb + rows * PREFIX_TOKENS * (loss_layer + 1) * 2 * kv_dim * wb \
        + rows * TARGET_TOKENS * vocab * 4 * 3
    plan.method = max(values, algebra) + batch * (n_l * d_k + d) * 8 * 4  # + keys, z, residuals (float64)


def _graph(rows: int, tokens: int, n_layers: int, act_layer: int, vocab: int, wb: int) -> int:
    """A forward and backward through the whole model: saved activations, the logits, their float32 log-softmax and,
    in the backward pass, the gradients of both (float32)."""
    return rows * tokens * (n_layers * act_layer * wb + vocab * (wb + 4 + 4 + 4))


def _kv_dim(conf: Any, d: int) -> int:
    heads = getattr(conf, "num_attention_heads", None) or getattr(conf, "n_head", None) or 1
    kv = getattr(conf, "num_key_value_heads", None) or heads
    head_dim = getattr(conf, "head_dim", None) or d // heads
    return int(kv) * int(head_dim)


def _mend_params(meth: dict, d: int, d_ff: int) -> int:
    """MEND's editor (methods/mend_net.py): per weight shape, n_hidden + 1 low-rank residual layers on d_in + d_out."""
    dim = d + d_ff
    r = min(int(meth.get("rank", 1920)), dim)
    n_shapes = len(set(meth.get("modules") or ["mlp_in", "mlp_out"]))
    per_layer = 2 * dim * r + dim + 2 * len(meth.get("layers") or []) * dim
    return n_shapes * (int(meth.get("n_hidden", 1)) + 1) * per_layer


def _ke_params(meth: dict, d: int, d_ff: int, n_mod: int) -> int:
    """KE's hypernetwork (methods/ke_net.py), approximately: a BiLSTM over embeddings, an FFNN to the condition, and
    per edited matrix an MLP from the condition to its rank-one factors."""
    lstm, cond, hidden = int(meth.get("lstm_dim", 128)), int(meth.get("condition_dim", 1024)), \
        int(meth.get("hidden_dim", 128))
    return 8 * lstm * (d + lstm) + 2 * lstm * cond + n_mod * (cond * hidden + hidden * (d + d_ff + 2))


def announce(cfg: DictConfig, task: str = "edit") -> MemoryPlan | None:
    """Print the plan; refuse in one line (ConfigError) when it does not fit. None when the model has no sizes."""
    try:
        plan = plan_memory(cfg, task)
    except ConfigError as e:
        if "model.config" in str(e) and not cfg.get(task, {}).get("dry_run", False):
            log.info("no memory plan: %s", e)
            return None
        raise
    print(plan.table(), flush=True)
    if (why := plan.refusal()) is not None and not cfg.get(task, {}).get("dry_run", False):
        raise ConfigError(why)
    return plan


