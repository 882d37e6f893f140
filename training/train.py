"""The reference trainer: AdamW + warmup-stable-decay, gradient accumulation, bf16 autocast on
GPU, resumable checkpoints, optional DDP (launch with ``torchrun``).

Run directory layout::

    OUT/config.json, model.safetensors, tokenizer.json, generation_config.json   latest checkpoint
    OUT/checkpoints/step-000123/   complete snapshot (weights + optimizer + train_state.json)
    OUT/metrics.jsonl, OUT/loss.png
    OUT/data-cache/                tokenized sources

A snapshot directory is written under a temporary name and renamed into place, and the
top-level weights are replaced with one atomic rename, so a SIGKILL at any moment leaves only
complete checkpoints behind; ``--resume`` continues from the newest snapshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gpts_edge.checkpoint import (
    CONFIG_FILE,
    GENERATION_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    default_model_dir,
    save_checkpoint,
)
from gpts_edge.config import PRESETS, ModelConfig
from gpts_edge.errors import GptsError
from gpts_edge.model import GPTS, state_to_weights, weights_to_state
from gpts_edge.training import calibrate, finetune, regularize
from gpts_edge.training.checkpointing import optim_from_tensors, optim_to_tensors, plot_metrics
from gpts_edge.training.checks import check_resume, check_train_config, parse_overrides, trim_metrics
from gpts_edge.training.data import DocumentFilter, load_sources, make_sampler, validation_windows
from gpts_edge.training.device import dist_info, pick_device
from gpts_edge.training.schedule import wsd_lr

STATE_FILE = "train_state.json"
OPTIM_FILE = "optimizer.safetensors"
EMA_FILE = "ema.safetensors"


@dataclass
class TrainConfig:
    preset: str = "gpt-s-1.4m"
    data: list[str] = field(default_factory=list)
    out: str = "runs/gpt-s"
    tokens: int | None = None  # total tokens; converted to max_steps
    max_steps: int | None = None
    stop_at: int | None = None  # stop (as if interrupted) after this step; the schedule keeps max_steps
    batch_size: int = 256
    grad_accum: int = 3
    seq_len: int | None = None  # default: the model's context
    lr: float = 3.5e-3
    warmup: int = 2000
    decay_start_frac: float = 0.8
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    device: str = "auto"
    dtype: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU (no bf16 units on our CPUs)
    compile: bool = False
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 200
    eval_windows: int = 64
    ckpt_every: int = 200
    ckpt_seconds: float = 600.0
    keep_snapshots: int = 2
    time_limit: float | None = None  # seconds of training; sets max_steps from measured speed
    tokenizer: str | None = None
    init: str | None = None  # start from these weights (see training/finetune.py), not their optimizer
    epochs: float | None = None  # passes over the training text; --max-steps / --tokens take precedence
    val_fraction: float | None = None  # hold out this tail of every source for validation
    keep: str = "last"  # top-level checkpoint: the newest ("last") or the best validation loss ("best")
    ema: float = 0.0  # decay per step of an average of the weights, validated beside them (0: off)
    dropout: float = 0.0  # on the residual branches while training (never at inference)
    embed_lr_scale: float = 1.0  # the tied embedding/head's LR as a fraction of --lr (0: frozen)
    decay_to_init: bool = False  # weight decay toward the initial weights (L2-SP), not toward zero
    calibrate: bool = False  # at the end, fit a temperature on the validation windows into the weights
    sampling: str = "random"  # random windows, or "passes": every token once per pass (data.PassSampler)
    cpu_micro_batch: int = 16  # on CPU, larger batches run as micro-batches of this size (0: off)
    resume: bool = False
    override_resume: str | None = None  # settings allowed to differ from the resumed snapshot's
    decontaminate: str | None = None  # eval folder/file: drop documents sharing a 13-gram with it
    progress: bool = True


PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "gpt-s-1.4m": {"batch_size": 256, "grad_accum": 3, "lr": 3.5e-3, "warmup": 2000, "tokens": 6_000_000_000},
    "finetune": finetune.FINETUNE_TRAINING,
    "tiny": {
        "batch_size": 8,
        "grad_accum": 1,
        "lr": 3e-3,
        "warmup": 10,
        "max_steps": 100,
        "log_every": 5,
        "eval_every": 20,
        "eval_windows": 8,
        "ckpt_every": 20,
    },
}


def preset_config(preset: str | None, **overrides: Any) -> TrainConfig:
    """A preset's numbers with the given overrides; no preset means ``finetune`` with --init and
    ``gpt-s-1.4m`` without."""
    if preset is None:
        preset = "finetune" if overrides.get("init") else "gpt-s-1.4m"
    if preset not in PRESET_TRAINING:
        raise GptsError(f"--preset: unknown preset {preset!r}; choose from {sorted(PRESET_TRAINING)}")
    values = {**PRESET_TRAINING[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(preset=preset, **values)


# --- snapshots --------------------------------------------------------------------------------
def _snapshots(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()
    )


# --- the trainer ------------------------------------------------------------------------------
class Trainer:
    def __init__(self, tc: TrainConfig, model_cfg: ModelConfig | None = None) -> None:
        check_train_config(tc)
        self.resume_overrides = parse_overrides(tc.override_resume)
        self.tc = tc
        self.rank, self.world, local_rank = dist_info()
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and tc.device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
        self.device = pick_device(tc.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        dtype = tc.dtype if tc.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if dtype not in ("bf16", "fp32"):
            raise GptsError(f"--dtype: expected auto, bf16 or fp32, found {tc.dtype!r}")
        self.autocast = dtype == "bf16"
        if self.device.type == "cpu":
            micro, accum = finetune.cpu_micro_batch(tc.batch_size, tc.grad_accum, tc.cpu_micro_batch)
            if micro != tc.batch_size:
                self._say(
                    f"cpu: batch {tc.batch_size} x {tc.grad_accum} runs as micro-batches of {micro} x {accum} "
                    f"accumulation steps (same sequences per step, memory a laptop has; "
                    f"--cpu-micro-batch 0 keeps {tc.batch_size})"
                )
                tc = self.tc = dataclasses.replace(tc, batch_size=micro, grad_accum=accum)
        self.out = Path(tc.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer_json = Path(tc.tokenizer) if tc.tokenizer else default_model_dir() / TOKENIZER_FILE
        self.init = finetune.resolve_init(tc.init, self.out) if tc.init else None
        self.generation: dict[str, Any] | None = None
        if self.init is not None:
            finetune.check_init_conflicts(self.init, tc.preset, tc.tokenizer)
            model_cfg = self.init.config
            self.tokenizer_json = self.init.tokenizer_json
            self.generation = self.init.checkpoint.generation
        elif tc.preset not in PRESETS and model_cfg is None:
            raise GptsError(f"--preset {tc.preset}: needs --init MODEL (the model to fine-tune)")
        self.cfg = model_cfg or PRESETS[tc.preset]
        self.seq_len = tc.seq_len or self.cfg.context_length
        if self.seq_len > self.cfg.context_length:
            raise GptsError(f"--seq-len {self.seq_len} exceeds the model context {self.cfg.context_length}")
        if not tc.max_steps and not tc.tokens and not tc.time_limit and not tc.epochs:
            raise GptsError("give --max-steps, --tokens, --epochs or --time-limit")

        cache = self.out / "data-cache"
        doc_filter, eval_summary = self._decontamination_filter() if tc.decontaminate else (None, None)
        if tc.val_fraction is not None:
            self.sources, self.seq_len, val = finetune.user_text_sources(
                tc.data,
                self.tokenizer_json,
                cache,
                self.seq_len,
                tc.val_fraction,
                tc.eval_windows,
                self._say,
                doc_filter=doc_filter,
            )
        else:
            self.sources = load_sources(tc.data, self.tokenizer_json, cache, self.seq_len, doc_filter)
            val = validation_windows(self.sources, self.seq_len, tc.eval_windows)
        self.decontamination = self._decontamination_report(eval_summary) if eval_summary else None
        self.val = torch.from_numpy(val)
        self.sampler = make_sampler(tc.sampling, self.sources, self.seq_len, seed=tc.seed + 1000 * self.rank)
        self.tokens_per_step = tc.batch_size * tc.grad_accum * self.seq_len * self.world
        self.max_steps = tc.max_steps or (math.ceil(tc.tokens / self.tokens_per_step) if tc.tokens else None)
        if not self.max_steps and tc.epochs:
            self.max_steps = finetune.steps_for_epochs(tc.epochs, self.sources, self.tokens_per_step)
        if tc.time_limit:  # the measured speed decides the length of the run
            self.max_steps = None
        if tc.preset == "finetune":  # 0 = sized to the run: warmup <= 10 % of it, ~10 evaluations
            n = self.max_steps or 500
            warmup = tc.warmup or min(10, max(1, n // 10))
            every = tc.eval_every or max(1, n // finetune.EVALS_PER_RUN)
            tc = self.tc = dataclasses.replace(tc, warmup=warmup, eval_every=every)
        if tc.eval_every <= 0:
            raise GptsError(f"--eval-every: expected a positive number, found {tc.eval_every}")

        torch.manual_seed(tc.seed)
        self.model = GPTS(self.cfg, dropout=tc.dropout).init_weights(tc.seed).to(self.device)
        self.opt, self.param_names = regularize.optimizer(
            self.model,
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            betas=tc.betas,
            embed_lr_scale=tc.embed_lr_scale,
            fused=self.device.type == "cuda",
        )
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.best: dict[str, Any] | None = None  # {"step", "val_loss"} of the kept checkpoint (--keep best)
        if self.init is not None:  # also on --resume: the initial weights anchor L2-SP and the EMA
            self.model.load_state_dict(weights_to_state(self.init.checkpoint.weights))
            self.model.to(self.device)
        self.ema = regularize.WeightEMA(self.model, tc.ema) if tc.ema else None
        self.to_init = (
            regularize.DecayToInit(self.opt, regularize.initial_copies(self.model))
            if tc.decay_to_init
            else None
        )
        if tc.resume:
            self._resume()
        elif _snapshots(self.out):
            raise GptsError(
                f"{self.out}: holds checkpoints of an earlier run; pass --resume or pick a new --out"
            )
        self.ddp_model: torch.nn.Module = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.fwd = torch.compile(self.ddp_model) if tc.compile else self.ddp_model

    # -- decontamination --
    def _decontamination_filter(self) -> tuple[DocumentFilter, dict[str, Any]]:
        from gpts_edge.contamination import load_eval_index

        index = load_eval_index(self.tc.decontaminate, option="--decontaminate")
        return DocumentFilter("decontamination", index.fingerprint, index.contaminated), index.summary()

    def _decontamination_report(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Per source: documents checked and dropped, tokens dropped; logged and kept in
        train_state.json. A prepared token folder has no text to check and says so."""
        report: dict[str, Any] = {
            "against": self.tc.decontaminate,
            "n": summary["n"],
            "eval_items": summary["items"],
            "eval_fingerprint": summary["fingerprint"],
            "sources": {},
        }
        for s in self.sources:
            d = s.dropped
            row = (
                {k: d[k] for k in ("checked", "documents", "tokens")}
                if d
                else {"checked": None, "note": "prepared token folder: not checked"}
            )
            report["sources"][s.name] = row
            if self.rank == 0:
                if d:
                    msg = f"dropped {d['documents']:,} of {d['checked']:,} documents ({d['tokens']:,} tokens)"
                else:
                    msg = "a prepared token folder, not checked"
                print(f"decontamination against {self.tc.decontaminate}: {s.name}: {msg}", flush=True)
        return report

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # -- state --
    def _resume(self) -> None:
        from safetensors.torch import load_file

        snaps = _snapshots(self.out)
        if not snaps:
            raise GptsError(f"{self.out}: --resume given but no checkpoint snapshot is there")
        if self.rank == 0:  # temporary directories of a run that was killed while saving
            for stale in (self.out / "checkpoints").glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        snap = snaps[-1]
        state = json.loads((snap / STATE_FILE).read_text())
        saved_cfg = ModelConfig.load(snap / CONFIG_FILE)
        if saved_cfg != self.cfg:
            raise GptsError(
                f"{snap}/{CONFIG_FILE}: the run's model config differs from --preset {self.tc.preset}"
            )
        if state["world_size"] != self.world:
            raise GptsError(f"{snap}: saved with {state['world_size']} processes, resuming with {self.world}")
        check_resume(snap, state.get("train_config", {}), dataclasses.asdict(self.tc), self.resume_overrides)
        from gpts_edge.checkpoint import load_weights

        weights = load_weights(snap / WEIGHTS_FILE, self.cfg)
        self.model.load_state_dict(weights_to_state(weights))
        self.model.to(self.device)
        optim_from_tensors(self.opt, self.param_names, load_file(str(snap / OPTIM_FILE)))
        if self.ema is not None:
            self.ema.load(load_file(str(snap / EMA_FILE)))
        self.sampler.set_state(state["sampler"][self.rank])
        self.step = state["step"]
        self.tokens_seen = state["tokens"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.best = state.get("best")
        if not self.tc.max_steps and not self.tc.tokens and not self.tc.time_limit:
            self.max_steps = state["max_steps"]
        if self.rank == 0:
            dropped = trim_metrics(self.out / "metrics.jsonl", self.step)
            note = f"; dropped {dropped} metrics rows logged after it" if dropped else ""
            print(f"resumed from {snap} at step {self.step} ({self.tokens_seen:,} tokens){note}", flush=True)

    def save(self) -> None:
        from safetensors.torch import save_file

        # The sampler state from before the prefetched (not yet trained on) batch was drawn:
        # resuming from sampler.state() itself would skip that batch.
        resume_state = getattr(self, "_sampler_state_before_prefetch", None) or self.sampler.state()
        samplers = [resume_state]
        if self.world > 1:
            samplers = [None] * self.world
            torch.distributed.all_gather_object(samplers, resume_state)
        if self.rank != 0:
            return
        root = self.out / "checkpoints"
        root.mkdir(exist_ok=True)
        final = root / f"step-{self.step:07d}"
        if final.exists():
            return
        for stale in root.glob(".tmp-*"):  # left by a run that was killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            weights = state_to_weights(self.model)
            save_checkpoint(tmp / "ckpt", self.cfg, weights, self.tokenizer_json, self.generation)
            for f in (tmp / "ckpt").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "ckpt").rmdir()
            save_file(optim_to_tensors(self.opt, self.param_names), str(tmp / OPTIM_FILE))
            if self.ema is not None:
                save_file(self.ema.tensors(), str(tmp / EMA_FILE))
            state = {
                "step": self.step,
                "tokens": self.tokens_seen,
                "max_steps": self.max_steps,
                "world_size": self.world,
                "sampler": samplers,
                "train_seconds": self.train_seconds,
                "decontamination": self.decontamination,
                "best": self.best,
                "train_config": {
                    k: v
                    for k, v in dataclasses.asdict(self.tc).items()
                    if k not in ("resume", "override_resume")
                },
            }
            # Written last: a snapshot without it is ignored by --resume.
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.tc.keep == "last":
            self._mirror(final)
        for old in _snapshots(self.out)[: -self.tc.keep_snapshots]:
            # Renamed out of sight first: a kill during rmtree must not leave a half-deleted
            # snapshot that still looks like one.
            doomed = old.with_name(f".tmp-delete-{old.name}")
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _mirror(self, src: Path) -> None:
        # The top level is a copy of a checkpoint; each file is replaced atomically and only
        # model.safetensors changes during a run, so the top level is always a whole checkpoint.
        # config.json goes last: until it exists the top level is not a checkpoint at all.
        for name in (TOKENIZER_FILE, GENERATION_FILE, WEIGHTS_FILE, CONFIG_FILE):
            tmpf = self.out / f".{name}.tmp"
            shutil.copyfile(src / name, tmpf)
            os.replace(tmpf, self.out / name)

    def _validate(self) -> dict[str, float]:
        """Validation loss of the weights (and of their EMA); with --keep best the top level then
        holds the weights with the lowest validation loss so far, the EMA's when it is lower."""
        rec = {"val_loss": round(self.evaluate(), 6)}
        candidates = [(rec["val_loss"], "raw")]
        if self.ema is not None:
            with self.ema.swapped_in(self.model):
                rec["ema_val_loss"] = round(self.evaluate(), 6)
            candidates.append((rec["ema_val_loss"], "ema"))
        val_loss, which = min(candidates)
        worse = self.best is not None and val_loss >= self.best["val_loss"]
        if self.tc.keep != "best" or self.rank != 0 or worse:
            return rec
        self.best = {"step": self.step, "val_loss": val_loss, "weights": which}
        with tempfile.TemporaryDirectory(prefix=".best-", dir=self.out) as d:
            with self.ema.swapped_in(self.model) if which == "ema" else contextlib.nullcontext():
                weights = state_to_weights(self.model)
            save_checkpoint(Path(d) / "ckpt", self.cfg, weights, self.tokenizer_json, self.generation)
            self._mirror(Path(d) / "ckpt")
        return rec

    # -- steps --
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, _ = self.fwd(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for chunk in self.val.split(max(1, self.tc.batch_size // 2)):
            losses.append(self._loss(chunk.to(self.device)).item() * len(chunk))
        self.model.train()
        return sum(losses) / len(self.val)

    def _next_batch(self) -> torch.Tensor:
        self._sampler_state_before_prefetch = self.sampler.state()
        b = torch.from_numpy(self.sampler.batch(self.tc.batch_size))
        if self.device.type == "cuda":
            return b.pin_memory().to(self.device, non_blocking=True)
        return b

    def train(self) -> dict[str, Any]:
        tc = self.tc
        metrics_path = self.out / "metrics.jsonl"
        log = open(metrics_path, "a") if self.rank == 0 else None  # noqa: SIM115 (closed in finally)
        bar = None
        last_ckpt_time = time.time()
        calib: list[float] = []
        last: dict[str, Any] = {}
        self.model.train()
        start_step = self.step
        post: dict[str, str] = {}
        if self.rank == 0:
            steps = f"{self.max_steps:,} steps" if self.max_steps else "steps set by --time-limit"
            print(
                f"training {steps} of {tc.batch_size} x {tc.grad_accum} x {self.seq_len} tokens "
                f"({self.tokens_per_step:,}/step) on {self.device.type}; "
                f"{sum(len(s.train) for s in self.sources):,} training tokens, "
                f"{self.val.numel():,} validation tokens",
                flush=True,
            )
            if levers := regularize.describe(tc):
                print(f"against over-fitting: {levers}", flush=True)
            if tc.progress:
                from tqdm import tqdm

                # Shown before the first step so a slow step on a CPU is visibly under way.
                bar = tqdm(
                    total=self.max_steps, initial=self.step, unit="step", mininterval=1.0, dynamic_ncols=True
                )
        if self.step == 0 and (self.init is not None or tc.keep == "best"):
            # The starting point's validation loss: the "before" of a fine-tune.
            val0 = self._validate()
            post["val"] = f"{val0['val_loss']:.3f}"
            if log is not None:
                log.write(json.dumps({"step": 0, "tokens": 0, **val0}) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix(post)
        nxt = self._next_batch()
        try:
            while self.max_steps is None or self.step < self.max_steps:
                if tc.stop_at is not None and self.step >= tc.stop_at:
                    break
                t0 = time.time()
                lr = wsd_lr(
                    self.step,
                    peak=tc.lr,
                    warmup=tc.warmup,
                    total=self.max_steps or 10**12,
                    decay_start_frac=tc.decay_start_frac,
                )
                regularize.set_lr(self.opt, lr)
                loss_sum = torch.zeros((), device=self.device)
                for micro in range(tc.grad_accum):
                    batch, nxt = nxt, None
                    sync = micro == tc.grad_accum - 1 or self.world == 1
                    ctx = self.ddp_model.no_sync() if not sync else contextlib.nullcontext()
                    with ctx:
                        loss = self._loss(batch) / tc.grad_accum
                        # Draw the next batch while the GPU works on this one.
                        nxt = self._next_batch()
                        loss.backward()
                    loss_sum += loss.detach()
                    if bar is not None and tc.grad_accum > 1:
                        bar.set_postfix({**post, "micro": f"{micro + 1}/{tc.grad_accum}"})
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
                self.opt.step()
                if self.to_init is not None:
                    self.to_init.after_step()
                if self.ema is not None:
                    self.ema.update(self.model)
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                need_log = self.step % tc.log_every == 0 or self.step == self.max_steps
                if (need_log or tc.time_limit and len(calib) < 40) and self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t0
                self.train_seconds += dt
                if tc.time_limit and self.max_steps is None:
                    calib.append(dt)
                    if len(calib) == 40:  # first steps include compilation; use the last 20
                        per_step = float(np.median(calib[20:]))
                        remaining = tc.time_limit - self.train_seconds
                        self.max_steps = self.step + max(1, int(remaining / per_step))
                        if self.rank == 0:
                            print(
                                f"time limit: {per_step * 1000:.1f} ms/step -> max_steps {self.max_steps}",
                                flush=True,
                            )
                if bar is not None:
                    if bar.total is None and self.max_steps:
                        bar.total = self.max_steps
                    bar.update(1)
                if need_log:
                    if self.world > 1:
                        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
                    rec = {
                        "step": self.step,
                        "loss": round(loss_sum.item(), 6),
                        "lr": lr,
                        "tokens": self.tokens_seen,
                        "tokens_per_s": round(self.tokens_per_step / max(dt, 1e-9)),
                        "grad_norm": round(float(gnorm), 4),
                    }
                    if self.step % tc.eval_every == 0 or self.step == self.max_steps:
                        rec.update(self._validate())
                        post["val"] = f"{rec['val_loss']:.3f}"
                    last = rec
                    if log is not None:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        if "val_loss" in rec:
                            plot_metrics(metrics_path, self.out / "loss.png")
                    if bar is not None:
                        post.update(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,}")
                        bar.set_postfix(post)
                if self.step % tc.ckpt_every == 0 or time.time() - last_ckpt_time > tc.ckpt_seconds:
                    self.save()
                    last_ckpt_time = time.time()
            if self.step > start_step or not _snapshots(self.out):
                if not last or "val_loss" not in last:
                    last = {**last, "step": self.step, **self._validate()}
                self.save()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        if self.rank == 0 and metrics_path.is_file():
            plot_metrics(metrics_path, self.out / "loss.png")
        result = {
            "step": self.step,
            "tokens": self.tokens_seen,
            **{k: last.get(k) for k in ("loss", "val_loss")},
            **({"best_step": self.best["step"], "best_val_loss": self.best["val_loss"]} if self.best else {}),
        }
        if tc.calibrate and self.rank == 0 and self.step == self.max_steps and self.step > start_step:
            result["temperature"] = calibrate.calibrate_checkpoint(self.out, self.val, self._say)
        return result


def train(tc: TrainConfig, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    trainer = Trainer(tc, model_cfg)
    try:
        return trainer.train()
    finally:
        if trainer.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
