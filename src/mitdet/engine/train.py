"""Train one backbone's detector, in the shape of torchvision's references/detection.

`train()` sets up (the index, the detector, the optimizer, a matching interrupted run from `last.pt`), then runs
`train_one_epoch` and `end_epoch` for each epoch, a final validation, and `finish` (final weights, train.json).
What the loop changes lives in one `RunState`, whose `state_dict` is what `last.pt` holds. Every file goes through
a temp file + rename.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mitdet.data.dataset import build_loader
from mitdet.data.index import load_split
from mitdet.engine import checkpoint as ckpt
from mitdet.engine import distributed
from mitdet.engine.device import amp_mode, backbone_autocast, resolve_device
from mitdet.engine.inference import predict
from mitdet.engine.logs import LOSS_KEYS, Histories, TensorBoard, now, progress_bar
from mitdet.engine.monitor import Monitor
from mitdet.engine.optim import Schedule, build_optimizer
from mitdet.engine.scoring import load_coco, score
from mitdet.engine.state import LossSums, Plan, RunState, make_plan
from mitdet.engine.stopping import Interrupted, StopFlag, locked, until_stopped
from mitdet.errors import ParamsError, TrainingError
from mitdet.io import write_json
from mitdet.models import build_detector, count_parameters
from mitdet.models.bundle import inference_spec, init_from_model, save_inference_model
from mitdet.models.pretrained import is_detector_folder, pretrained_for
from mitdet.params import DEFAULT_SCORER, ModelParams, TrainParams
from mitdet.runtime import machine_info
from mitdet.paths import BackbonePaths

log = logging.getLogger(__name__)


def _never(step: int) -> bool:
    return False


@dataclass(frozen=True)
class Hooks:
    """Seams for tests: `build_model` replaces `build_detector` (same arguments); `should_stop(step)`, checked
    after every optimizer step and epoch, stops the run as SIGTERM would (last.pt saved, `Interrupted` raised)."""
    build_model: Callable[..., nn.Module] = build_detector
    should_stop: Callable[[int], bool] = _never


# ------------------------------------------------------------------------------------------ small helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------ what the run is
@dataclass
class Data:
    """The run's batches: one training loader for the whole run (or N fixed batches), validation loaders."""
    categories: list
    train_loader: Any = None
    fixed_batches: list | None = None
    val_loader: Any = None
    quick_loader: Any = None
    val_gt: Any = None

    @property
    def label_to_category(self) -> dict[int, int]:
        return {c.label: c.id for c in self.categories}

    @property
    def names(self) -> dict[int, str]:
        return {c.id: c.name for c in self.categories}


@dataclass
class Run:
    """What set-up builds and the loop only reads: params, device, plan, data, the model wrapped for DDP."""
    backbone: str
    params: TrainParams
    model_params: ModelParams
    out: BackbonePaths
    device: torch.device
    amp: str
    dist: distributed.Dist
    plan: Plan
    data: Data
    hooks: Hooks
    fingerprint: dict
    scorer: str = DEFAULT_SCORER
    ddp: nn.Module | None = None
    stop_flag: StopFlag | None = None
    tb: TensorBoard | None = None
    bar: Any = None

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def last_path(self) -> Path:
        return Path(self.out.checkpoints) / "last.pt"

    @property
    def best_path(self) -> Path:
        return Path(self.out.checkpoints) / "best.pt"


# ------------------------------------------------------------------------------------------------ set up
def train(backbone: str, train: TrainParams, model: ModelParams, seed: int, index_dir: str = "data/index",
          out: BackbonePaths | None = None, hooks: Hooks | None = None,
          scorer: str = DEFAULT_SCORER) -> dict:
    """Train `backbone` with `train` (per-backbone overrides already applied) and `model`; return train.json.

    Resumes a matching interrupted `last.pt`; raises `Interrupted` after saving it on SIGINT/SIGTERM. `scorer`
    (params.evaluate.scorer) scores the validations, as it scores the evaluate stage.
    """
    out, hooks = out or BackbonePaths(backbone), hooks or Hooks()
    try:
        with locked(Path(out.checkpoints), enabled=int(os.environ.get("RANK", "0")) == 0):
            run, state, saved = set_up(backbone, train, model, seed, index_dir, out, hooks)
            run.scorer = scorer
            if state.finished:  # same params, data and code: rewrite the outputs from it
                log.info("%s holds a finished run matching these params: rewriting its outputs", run.last_path)
                return finish(run, state, dict(state.result), final_weights=saved.get("final_weights", False))
            begin_training(run, state, saved, seed)
            with StopFlag() as run.stop_flag, backbone_autocast(state.model, run.device, run.amp):
                try:
                    train_epochs(run, state)
                    if run.params.val.interval > 0 and state.last_val_step != state.step:
                        validate_now(run, state, state.epoch)  # the final weights were not validated yet
                finally:
                    run.bar.close()
                    run.tb.close()
            return finish(run, state, summary(run, state))
    finally:
        distributed.cleanup()


def set_up(backbone, train, model, seed, index_dir, out, hooks) -> tuple[Run, RunState, dict]:
    """Device, data, plan and model; the run's state, restored from a matching `last.pt` (also returned)."""
    device, dist_info = _device_and_ranks(train)
    if model.compile and device.type == "cpu":
        # torch 2.14's Inductor fails on the backbone's symbolic input sizes in CPU training (and with static
        # shapes its steady steps were slower than eager): refuse it before any work rather than after a minute
        raise ParamsError("torch.compile is not supported for training on the CPU", where="model.compile",
                          fix="set model.compile: false (it is meant for CUDA)")
    train_split = load_split(index_dir, "train")
    fp = ckpt.fingerprint(train, model, seed, index_dir, {"backbone": backbone, "world_size": dist_info.world_size})
    saved = _resume_point(Path(out.checkpoints), fp, dist_info.is_main)
    data = Data(categories=train_split.categories)
    loader_args = dict(model=model, train=train, seed=seed, batch_size=train.batch_size,
                       num_workers=train.num_workers, rank=dist_info.rank, world_size=dist_info.world_size)
    plan = make_plan(train, _training_batches(data, train_split, train, saved, loader_args))
    run = Run(backbone, train, model, out, device, amp_mode(train.amp, device), dist_info, plan, data, hooks, fp)

    seed_everything(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    det = hooks.build_model(backbone, num_classes=len(data.categories) + 1, model=model,
                            train_min_sizes=tuple(train.augment.multi_scale) or None,
                            aux_channels=train_split.aux_channels if model.modality == "rgbx" else 0)
    start_from_trained_model(det, backbone, model, data.categories)
    det.to(device)  # build_detector applies model.channels_last and model.compile (in place)
    optimizer = build_optimizer(det, train)
    state = RunState(model=det, optimizer=optimizer,
                     schedule=Schedule(optimizer, train, plan.total_steps, plan.steps_per_epoch),
                     scaler=torch.amp.GradScaler("cuda", enabled=(run.amp == "fp16")),
                     monitor=Monitor.from_params(train), histories=Histories(out, run.main), sums=LossSums(device))
    if saved:
        state.load_state_dict(saved, dist_info.rank)
        if not state.finished:
            log.info("resuming %s from step %d of %d (epoch %d, batch %d)", run.last_path, state.step,
                     plan.total_steps, state.epoch, state.batch_in_epoch)
    _validation_data(run, index_dir, train_split, loader_args)
    return run, state, saved or {}


def start_from_trained_model(det: nn.Module, backbone: str, model: ModelParams, categories: list) -> None:
    """When `model.pretrained` names a trained mitdet model folder: start from all of its weights (the box
    predictor rebuilt when the categories differ). Encoder checkpoints are loaded by build_detector."""
    source = pretrained_for(model.pretrained, backbone) if model.pretrained else None
    if source and is_detector_folder(source):
        rebuilt = init_from_model(det, source, categories)
        log.info("starting from the trained model in %s%s", source,
                 ": its box predictor is rebuilt for these categories (they differ)" if rebuilt else "")


def _device_and_ranks(train: TrainParams) -> tuple[torch.device, distributed.Dist]:
    device = resolve_device(train.device)
    dist_info = distributed.init(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device())
    if not dist_info.is_main:
        logging.getLogger("mitdet").setLevel(logging.ERROR)  # only rank 0 prints
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    return device, dist_info


def _resume_point(ck_dir: Path, fp: dict, main: bool) -> dict | None:
    """The matching last.pt, or a stored finished run of these params, decided by rank 0 and followed by the
    others; without a matching last.pt, an earlier run's best.pt and epoch_NNN.pt are removed."""
    state, path = None, None
    if main:
        state, path = ckpt.load_resumable(ck_dir, fp)
        if state is not None and _best_is_missing(state, ck_dir):
            ckpt.set_aside(path, "finished, but its final weights were best.pt, which is gone",
                           then="looking for a stored finished run of these params, else training again")
            state = None
        if state is None:
            for stale in [ck_dir / "best.pt", *ck_dir.glob("epoch_*.pt")]:
                if stale.exists():
                    stale.unlink()
                    log.info("removed %s of an earlier run", stale)
            state, path = ckpt.load_finished(ck_dir, fp), ckpt.finished_path(ck_dir, fp)
            if state is not None:
                log.info("%s: these params were trained before: restoring that run's outputs", path)
    path = distributed.broadcast_object(str(path) if state is not None else None)
    if path is not None and not main:
        state = ckpt.load(path)
    return state


def _best_is_missing(state: dict, ck_dir: Path) -> bool:
    """A finished last.pt whose final weights are best.pt's, without best.pt (a stored finished run of the
    same params, holding its final weights, is looked up next)."""
    return state["finished"] and state["result"].get("weights_from") == "best" and not (ck_dir / "best.pt").exists() \
        and not state.get("final_weights", False)


def _training_batches(data: Data, split, train: TrainParams, saved: dict | None, loader_args: dict) -> int:
    """Build the training batches (a loader positioned at the resume point, or N fixed batches); their count."""
    if train.overfit_batches > 0:  # N fixed batches, no augmentation, in index order; validated on themselves
        fixed = build_loader(split, training=False, limit_images=train.overfit_batches * train.batch_size,
                             **loader_args)
        data.fixed_batches = list(fixed)
        return len(data.fixed_batches)
    epoch, batch = (saved["epoch"], saved["batch_in_epoch"]) if saved else (0, 0)
    data.train_loader = build_loader(split, training=True, epoch=epoch, skip_batches=batch, **loader_args)
    return len(data.train_loader)  # the same for every epoch and rank; skipping does not change it


def _validation_data(run: Run, index_dir: str, train_split, loader_args: dict) -> None:
    """Validation and quick-eval loaders (rank 0 validates on every image) and the ground truth, loaded once."""
    train = run.params
    if train.val.interval <= 0 and train.quick_eval.interval <= 0:
        return
    overfit = train.overfit_batches > 0
    split = train_split if overfit else load_split(index_dir, "val")
    gt_json = Path(index_dir) / ("instances_train.json" if overfit else "instances_val.json")
    limit = min(train.val.max_images or 10**9, train.overfit_batches * train.batch_size) if overfit \
        else train.val.max_images
    args = dict(loader_args, rank=0, world_size=1)
    if train.val.interval > 0:
        run.data.val_loader = build_loader(split, training=False, limit_images=limit, **args)
        if run.main:
            run.data.val_gt = str(gt_json)
    if train.quick_eval.interval > 0:  # a few images: no worker processes kept for them
        run.data.quick_loader = build_loader(split, training=False, limit_images=train.quick_eval.samples,
                                             **{**args, "num_workers": 0})


def begin_training(run: Run, state: RunState, saved: dict, seed: int) -> None:
    """From here on only the training RNG streams (seeded per rank, or restored) shape the run."""
    if saved:
        ckpt.set_rng_state(saved["ranks"][run.dist.rank]["rng"])  # this rank's own streams
    else:
        seed_everything(seed + run.dist.rank)
    run.ddp = distributed.wrap(state.model, run.dist, run.device)
    state.model.train()
    if run.data.val_gt is not None:
        run.data.val_gt = load_coco(run.data.val_gt, scorer=run.scorer)  # once: every validation scores with it
    run.tb = TensorBoard(str(Path(run.out.model_dir) / "tensorboard" / run.fingerprint["hash"][:12])
                         if (run.main and run.params.tensorboard) else None, purge_step=state.step or None)
    run.bar = progress_bar(run.plan.total_steps, state.step, enabled=run.main and sys.stderr.isatty())
    state.session_start = state.log_start = time.perf_counter()
    state.session_first_step = state.step
    if run.main:  # the logs as of the resumed step (rows written after its checkpoint are dropped), then live
        state.histories.flush()
        write_progress(run, state, None)


# ------------------------------------------------------------------------------------------------- loop
def train_epochs(run: Run, state: RunState) -> None:
    """Epochs from the resume point to the end of the plan (none when a resumed run had none left)."""
    if state.early_stopped or state.step >= run.plan.total_steps:
        return
    while state.epoch < run.plan.num_epochs:
        full_epoch = train_one_epoch(run, state)
        end_epoch(run, state, full_epoch)
        if state.early_stopped or state.step >= run.plan.total_steps:
            return
        if _stop_requested(run, state.step):
            raise Interrupted(state.step, run.stop_flag.signum)


def train_one_epoch(run: Run, state: RunState) -> bool:
    """The batches of `state.epoch` from `state.batch_in_epoch` on; returns whether the epoch was used whole."""
    end, accum = run.plan.batches_used, run.plan.accum
    batch_idx = state.batch_in_epoch
    micro = 0
    step_loss = torch.zeros(5, device=run.device)
    state.epoch_start = time.perf_counter()
    for images, targets, skipped in until_stopped(_epoch_batches(run, state.epoch, batch_idx), run.stop_flag):
        if batch_idx >= end or state.step >= run.plan.total_steps:
            break
        state.images_skipped += skipped
        batch_idx += 1
        if not images:  # every image of the batch failed to decode (counted above)
            continue
        micro += 1
        step_loss += forward_backward(run, state, images, targets, sync=micro % accum == 0)
        if micro % accum:
            continue
        keep_going, lr_used = optimizer_step(run, state, step_loss)
        state.batch_in_epoch = batch_idx
        after_step(run, state, keep_going, lr_used)
        if state.early_stopped or state.step >= run.plan.total_steps or batch_idx >= end:
            break
    if run.stop_flag.signum is not None and state.batch_in_epoch < end and state.step < run.plan.total_steps:
        save_last(run, state)  # the loader ended early: its workers died of the stop signal
        raise Interrupted(state.step, run.stop_flag.signum)
    return batch_idx >= end


def _epoch_batches(run: Run, epoch: int, skip: int):
    """An iterator over the epoch's batches after the first `skip`, created without moving the RNG streams."""
    end = run.plan.batches_used
    with ckpt.preserved_rng():  # creating the iterator draws seeds
        if run.data.fixed_batches is not None:
            return iter(run.data.fixed_batches[skip:end])
        if skip >= end:
            return iter(())
        run.data.train_loader.batch_sampler.set_epoch(epoch)  # it skips `skip` batches of its first epoch only
        return iter(run.data.train_loader)


def forward_backward(run: Run, state: RunState, images, targets, sync: bool) -> torch.Tensor:
    """Losses of one micro-batch and their gradients (DDP syncs them on the accumulation's last batch only);
    returns the total loss and its four components, divided by the accumulation."""
    images, targets = to_device(images, targets, run.device)
    accum = run.plan.accum
    with (contextlib.nullcontext() if sync or not run.dist.enabled else run.ddp.no_sync()):
        try:
            loss_dict = run.ddp(images, targets)
            loss = sum(loss_dict.values())
            state.scaler.scale(loss / accum).backward()
        except torch.OutOfMemoryError:
            raise TrainingError(f"CUDA out of memory at train.batch_size = {run.params.batch_size} (grad_accum "
                                f"{accum})", fix="lower train.batch_size and raise train.grad_accum to keep the "
                                "effective batch") from None
    state.sums.window[5] += len(images)
    state.images_seen += len(images) * run.dist.world_size
    return torch.stack([loss.detach().float()] + [loss_dict[k].detach().float() for k in LOSS_KEYS]) / accum


def optimizer_step(run: Run, state: RunState, step_loss: torch.Tensor) -> tuple[bool, float]:
    """One optimizer step, skipped (no update) when the loss was not finite on some rank; `step_loss` is reset.

    One host sync learns whether the loss was finite and whether a stop was asked. Returns (keep going, lr used).
    """
    flags = torch.stack([torch.isfinite(step_loss).all().float(),
                         torch.tensor(float(run.stop_flag.signum is None), device=run.device)])
    finite, keep_going = (bool(x) for x in distributed.all_reduce_min(flags).tolist())
    lr_used = state.schedule.lr
    if finite:
        if run.params.clip_grad_norm > 0:
            state.scaler.unscale_(state.optimizer)
            params = [p for g in state.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, run.params.clip_grad_norm)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.sums.add_step(step_loss)
    state.optimizer.zero_grad(set_to_none=True)
    state.schedule.step()
    state.step += 1
    run.bar.update(1)
    state.monitor.step_ok(finite, state.step, str(run.last_path))
    step_loss.zero_()
    return keep_going, lr_used


def after_step(run: Run, state: RunState, keep_going: bool, lr_used: float) -> None:
    """Log row, quick eval, step-based validation, the periodic checkpoint, and a requested stop."""
    train, step, total = run.params, state.step, run.plan.total_steps
    if step % train.log_every_steps == 0 or step == total:
        log_row(run, state, lr_used)
    if run.data.quick_loader is not None and run.main and step % train.quick_eval.interval == 0:
        quick_eval(run, state.model, step)
    if train.val.interval > 0 and train.val.unit == "steps" and step % train.val.interval == 0:
        validate_now(run, state, state.epoch + 1)
    if train.checkpoint.every_steps and step % train.checkpoint.every_steps == 0:
        state.clock_epoch()
        save_last(run, state)
    if (not keep_going or run.hooks.should_stop(step)) and step < total:
        state.clock_epoch()
        save_last(run, state)
        raise Interrupted(step, run.stop_flag.signum)


def log_row(run: Run, state: RunState, lr_used: float) -> None:
    """A row of train_batches.csv (mean losses since the last row over all ranks), the bar, TensorBoard."""
    sums = state.sums.reduce_window()
    n_ok = sums["steps"]  # finite steps x ranks; none: the losses are empty, not 0
    row = {"epoch": state.epoch + 1, "step": state.step, "lr": lr_used, "timestamp": now(),
           "images_per_s": sums["images"] / max(time.perf_counter() - state.log_start, 1e-9),
           **{k: (sums[k] / n_ok if n_ok else None) for k in ("loss", *LOSS_KEYS)}}
    state.histories.batches.append(row)  # written at the next checkpoint save, epoch end or the end
    if n_ok:
        state.monitor.loss_logged(row["loss"], state.step)
    shown = "-" if row["loss"] is None else f"{row['loss']:.4f}"
    ema = "-" if state.monitor.loss_ema is None else f"{state.monitor.loss_ema:.4f}"
    run.bar.set_postfix(loss=shown, ema=ema, lr=f"{lr_used:.2e}", img_s=f"{row['images_per_s']:.1f}", refresh=False)
    if run.bar.disable:
        done = state.step - state.session_first_step
        eta = (run.plan.total_steps - state.step) * (time.perf_counter() - state.session_start) / done
        log.info("step %d/%d epoch %d: loss %s (avg %s) lr %.3g %.1f images/s ETA %s", state.step,
                 run.plan.total_steps, state.epoch + 1, shown, ema, lr_used, row["images_per_s"],
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
    run.tb.scalars(state.step, {"train/" + k: row[k] for k in ["loss", *LOSS_KEYS, "lr", "images_per_s"]})
    write_progress(run, state, row)
    state.log_start = time.perf_counter()


def write_progress(run: Run, state: RunState, row: dict | None) -> None:
    """metrics/<b>/train.json while the run goes (`finished: false`): what `dvc exp show` shows of it live."""
    if not run.main:
        return
    monitor = state.monitor
    progress = {
        "backbone": run.backbone, "finished": False, "steps": state.step, "total_steps": run.plan.total_steps,
        "epoch": state.epoch + 1, "final_loss": row["loss"] if row else None, "lr": state.schedule.lr,
        "images_per_s": row["images_per_s"] if row else None, "seconds": state.elapsed(),
        "best_metric": monitor.best if monitor.best_step >= 0 else None, "monitor": run.params.val.monitor}
    write_json(run.out.train_metrics, progress)
    write_json(run.out.train_summary, train_summary(run.backbone, progress))  # the DVC metric, live too


def end_epoch(run: Run, state: RunState, full_epoch: bool) -> None:
    """Validation (every `train.val.interval` epochs), the epoch's row, last.pt and the kept epoch_NNN.pt."""
    train, epoch = run.params, state.epoch
    state.clock_epoch()
    val, is_best = None, False
    if train.val.interval > 0 and train.val.unit == "epochs" and full_epoch \
            and (epoch + 1) % train.val.interval == 0 and state.last_val_step != state.step:
        val, is_best = validate_now(run, state, epoch + 1)
    ck_name = run.last_path
    if run.main and train.checkpoint.keep > 0 and full_epoch:
        ck_name = Path(run.out.checkpoints) / f"epoch_{epoch + 1:03d}.pt"
    state.histories.epochs.append({
        "epoch": epoch + 1, "avg_loss": state.sums.reduce_epoch(), "epoch_seconds": state.epoch_seconds,
        "lr": state.schedule.lr, "val_AP": val["AP"] if val else None, "val_AP50": val["AP50"] if val else None,
        "is_best": int(is_best), "checkpoint": str(ck_name), "timestamp": now()})
    run.tb.scalars(state.step, {"epoch/avg_loss": state.histories.epochs.rows[-1]["avg_loss"]})
    state.epoch_seconds = 0.0
    state.epoch, state.batch_in_epoch = epoch + 1, 0
    save_last(run, state)
    if run.main and ck_name != run.last_path:
        ckpt.copy(run.last_path, ck_name)
        ckpt.prune_periodic(run.out.checkpoints, train.checkpoint.keep)


def _stop_requested(run: Run, step: int) -> bool:
    """A stop signal on any rank, or the test hook."""
    flags = torch.tensor([float(run.stop_flag.signum is None)], device=run.device)
    return not distributed.all_reduce_min(flags).item() or run.hooks.should_stop(step)


def save_last(run: Run, state: RunState) -> None:
    """Write last.pt (rank 0) and flush the CSVs; every rank calls it (it gathers each rank's own state)."""
    ranks = distributed.all_gather_object(state.rank_state())
    if run.main:
        ckpt.save(run.last_path, state.state_dict(run.fingerprint, ranks))


# ------------------------------------------------------------------------------------------- evaluation
def quick_eval(run: Run, model: nn.Module, step: int) -> None:
    """Predictions on a few images: how many, which categories, the top-k by count (log lines only)."""
    with ckpt.preserved_rng():
        results, stats = predict(model, run.data.quick_loader, run.device, run.data.label_to_category,
                                 amp=run.amp, progress=False)
    model.train()
    counts = Counter(r["category_id"] for r in results)
    names = run.data.names
    top = ", ".join(f"{names.get(c, c)}:{n}" for c, n in counts.most_common(run.params.quick_eval.top_k))
    log.info("quick eval at step %d: %d predictions on %d images, %d categories detected; top: %s",
             step, len(results), stats["images"], len(counts), top or "-")


def validate(model, loader, device, amp: str, label_to_category: dict, gt, step: int) -> dict:
    """COCO AP/AP50/AP75 on the validation images (rank 0), with the top and bottom classes in the log.

    `gt`: the ground truth as `scoring.load_coco` returns it (loaded once per run), or its path.
    """
    with ckpt.preserved_rng():
        results, stats = predict(model, loader, device, label_to_category, amp=amp, progress=False)
        scores = score(gt, results, image_ids=stats["image_ids"]) if stats["images"] else None
    model.train()
    if scores is None:  # nothing to validate on: no AP, not AP 0
        log.warning("validation at step %d: the validation split has no images; no AP recorded", step)
        return {"AP": None, "AP50": None, "AP75": None}
    s = {k: float(scores.summary.get(k) or 0.0) for k in ("AP", "AP50", "AP75")}
    ranked = sorted(((v["AP"], name) for name, v in scores.per_class.items() if v.get("AP") is not None),
                    reverse=True)
    top = ", ".join(f"{n} {ap:.3f}" for ap, n in ranked[:3])
    bottom = ", ".join(f"{n} {ap:.3f}" for ap, n in ranked[-3:][::-1])
    log.info("validation at step %d on %d images: AP %.4f AP50 %.4f AP75 %.4f | best classes: %s | worst: %s",
             step, stats["images"], s["AP"], s["AP50"], s["AP75"], top or "-", bottom or "-")
    return s


def validate_now(run: Run, state: RunState, epoch: int) -> tuple[dict, bool]:
    """Validate on rank 0 and share the result: the history row, best.pt, early stopping, a plateau schedule.

    `epoch`: the 1-based epoch the row and best.pt name (the epoch in progress, or the last one ended).
    """
    step, name = state.step, run.params.val.monitor
    result = None
    if run.main:
        result = validate(state.model, run.data.val_loader, run.device, run.amp, run.data.label_to_category,
                          run.data.val_gt, step)
    result = distributed.broadcast_object(result)
    state.last_val_step = step
    is_best = False
    if result[name] is not None:
        is_best, stop = state.monitor.validated(result[name], step, epoch)
        state.schedule.observe(result[name])
        state.early_stopped = state.early_stopped or stop
    if run.main:
        state.histories.val.append({"step": step, "epoch": epoch, **result})
        if is_best:
            ckpt.save(run.best_path, {"model": state.model.state_dict(), "step": step, "epoch": epoch,
                                      "fingerprint": run.fingerprint, "metric": result[name], "monitor": name})
    run.tb.scalars(step, {f"val/{k}": v for k, v in result.items()})
    return result, is_best


# ------------------------------------------------------------------------------------------------- end
def summary(run: Run, state: RunState) -> dict:
    """train.json of a run that just ended; last.pt is saved finished with it."""
    monitor, seconds = state.monitor, state.elapsed()
    validated = monitor.best_step >= 0
    batches = state.histories.batches.rows
    result = {
        "backbone": run.backbone, "epochs": round(state.step / run.plan.steps_per_epoch, 3), "steps": state.step,
        "total_steps": run.plan.total_steps, "best_epoch": monitor.best_epoch if validated else None,
        "best_step": monitor.best_step if validated else None, "best_metric": monitor.best if validated else None,
        "monitor": run.params.val.monitor, "weights_from": "best" if validated else "last",
        "early_stopped": state.early_stopped, "final_loss": batches[-1]["loss"] if batches else None,
        "seconds": seconds, "images_seen": state.images_seen, "images_per_s": state.images_seen / max(seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(run.device), "images_skipped": state.images_skipped,
        "nonfinite_steps": monitor.nonfinite_steps, "params": count_parameters(state.model), "lr": state.schedule.lr,
        "amp": run.amp, "device": run.device.type, "world_size": run.dist.world_size,
        "resumed_from_step": state.resumed_from_step, "finished": True,
        "machine": machine_info(run.device),  # what it ran on: results differ across thread counts and CPUs
    }
    state.finished, state.result, state.batch_in_epoch = True, result, 0
    save_last(run, state)
    return result


def train_summary(backbone: str, result: dict) -> dict:
    """train_summary.json, the train stage's DVC metric: train.json's comparable keys under the backbone's name."""
    return {backbone: {k: result.get(k) for k in ("steps", "final_loss", "best_metric")}}


def finish(run: Run, state: RunState, result: dict, final_weights: bool = False) -> dict:
    """Final weights (best if validation ran, else last; `final_weights`: the state's own, as a stored finished
    run holds them), train.json and the CSVs, and the finished run stored for going back: rank 0 writes."""
    if run.main:
        if result["weights_from"] == "best" and not final_weights:
            state.model.load_state_dict(ckpt.load(run.best_path)["model"])
        spec = inference_spec(run.backbone, run.data.categories, run.model_params, result["weights_from"],
                              result["steps"])
        save_inference_model(state.model, spec, run.out.model_dir)
        state.histories.flush()
        write_json(run.out.train_metrics, result)
        write_json(run.out.train_summary, train_summary(run.backbone, result))
        if not final_weights:
            stored = {**state.state_dict(run.fingerprint, ranks=[]), "optimizer": None, "final_weights": True}
            ckpt.keep_finished(run.out.checkpoints, run.fingerprint, stored, run.params.checkpoint.keep_finished)
        log.info("%s: %d steps in %.0f s (%.2f images/s); weights from %s.pt -> %s", run.backbone, result["steps"],
                 result["seconds"], result["images_per_s"], result["weights_from"], run.out.weights)
    distributed.barrier()
    return result
