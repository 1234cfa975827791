"""Train one backbone's detector: the loop, top to bottom (in the style of torchvision's references).

`train()` reads the index, builds the detector, resumes a matching interrupted run from `last.pt`, runs the
optimizer steps with logging, quick evals, validation and checkpoints, and writes the final weights and
`metrics/<b>/train.json`. Everything it writes goes through temp file + rename.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from mitdet.data.dataset import build_loader
from mitdet.data.index import load_split
from mitdet.engine import checkpoint as ckpt
from mitdet.engine import distributed
from mitdet.engine.evaluate import amp_mode, backbone_autocast, predict, resolve_device
from mitdet.engine.logs import (BATCH_COLUMNS, EPOCH_COLUMNS, LOSS_KEYS, VAL_COLUMNS, CsvLog, TensorBoard, now,
                                progress_bar)
from mitdet.engine.monitor import Monitor
from mitdet.engine.optim import Schedule, build_optimizer
from mitdet.engine.scoring import load_coco, score
from mitdet.io import write_json
from mitdet.models import build_detector, count_parameters, save_inference_model
from mitdet.params import ModelParams, TrainParams, to_dict
from mitdet.paths import BackbonePaths

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM or a hook) after writing last.pt."""

    def __init__(self, step: int, signum: int | None):
        super().__init__(f"interrupted at step {step}: run `dvc repro` again to resume")
        self.step, self.signum = step, signum


# ------------------------------------------------------------------------------------------ small helpers
def seed_everything(seed: int) -> None:
    import random

    import numpy as np
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


def until_stopped(batches, stop_flag: "StopFlag"):
    """The batches, ending quietly when loader workers die of the same SIGINT that asked the loop to stop."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except Exception:
            if stop_flag.signum is None:
                raise
            return
        yield item


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the current step and save; a second signal stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a loader worker forked with this handler: the main process stops it
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing the current step, then saving last.pt", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@contextlib.contextmanager
def locked(directory: Path, enabled: bool = True):
    """An exclusive lock on the checkpoint folder: a second trainer (e.g. a second `dvc repro`) fails at once."""
    if not enabled:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another trainer is running on {directory} (its .lock is held); wait for it or "
                               "stop it first") from None
        yield


# ------------------------------------------------------------------------------------------- evaluation
def quick_eval(model, loader, device, amp: str, label_to_category: dict, names: dict, top_k: int, step: int):
    """Predictions on a few images: how many, which categories, the top-k by count (log lines only)."""
    with ckpt.preserved_rng():
        results, stats = predict(model, loader, device, label_to_category, amp=amp, progress=False)
    model.train()
    counts = Counter(r["category_id"] for r in results)
    top = ", ".join(f"{names.get(c, c)}:{n}" for c, n in counts.most_common(top_k))
    log.info("quick eval at step %d: %d predictions on %d images, %d categories detected; top: %s",
             step, len(results), stats["images"], len(counts), top or "-")


def validate(model, loader, device, amp: str, label_to_category: dict, gt, step: int) -> dict:
    """COCO AP/AP50/AP75 on the validation images (rank 0), with the top and bottom classes in the log.

    `gt`: the ground truth as `scoring.load_coco` returns it (loaded once per run), or its path.
    """
    with ckpt.preserved_rng():
        results, stats = predict(model, loader, device, label_to_category, amp=amp, progress=False)
        scores = score(gt, results, image_ids=stats["image_ids"])
    model.train()
    s = {k: float(scores.summary.get(k) or 0.0) for k in ("AP", "AP50", "AP75")}
    ranked = sorted(((v["AP"], name) for name, v in scores.per_class.items() if v.get("AP") is not None),
                    reverse=True)
    top = ", ".join(f"{n} {ap:.3f}" for ap, n in ranked[:3])
    bottom = ", ".join(f"{n} {ap:.3f}" for ap, n in ranked[-3:][::-1])
    log.info("validation at step %d on %d images: AP %.4f AP50 %.4f AP75 %.4f | best classes: %s | worst: %s",
             step, stats["images"], s["AP"], s["AP50"], s["AP75"], top or "-", bottom or "-")
    return s


# ------------------------------------------------------------------------------------------------ train
def train(backbone: str, train: TrainParams, model: ModelParams, seed: int, index_dir: str = "data/index",
          out: BackbonePaths | None = None, fingerprint_extra: dict | None = None,
          should_stop: Callable[[int], bool] | None = None, model_fn: Callable | None = None) -> dict:
    """Train `backbone` with `train` (per-backbone overrides already applied) and `model`; return train.json.

    Resumes a matching interrupted `last.pt`; raises `Interrupted` after saving it on SIGINT/SIGTERM or when
    `should_stop(step)` says so. `model_fn` replaces `build_detector` (same arguments), for tests.
    """
    out = out or BackbonePaths(backbone)
    try:
        with locked(Path(out.checkpoints), enabled=int(os.environ.get("RANK", "0")) == 0):
            return _train(backbone, train, model, seed, index_dir, out, fingerprint_extra, should_stop, model_fn)
    finally:
        distributed.cleanup()


def _train(backbone, train, model, seed, index_dir, out, fingerprint_extra, should_stop, model_fn) -> dict:
    device = resolve_device(train.device)
    dist_info = distributed.init(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device())
    main = dist_info.is_main
    if not main:
        logging.getLogger("mitdet").setLevel(logging.ERROR)  # only rank 0 prints
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    amp = amp_mode(train.amp, device)

    # -- data: the index only (never the raw annotations)
    train_split = load_split(index_dir, "train")
    categories = train_split.categories
    label_to_category = {c.label: c.id for c in categories}
    names = {c.id: c.name for c in categories}
    bs, accum = train.batch_size, train.grad_accum
    loader_args = dict(model=model, train=train, seed=seed, batch_size=bs, num_workers=train.num_workers,
                       rank=dist_info.rank, world_size=dist_info.world_size)

    # -- the run's identity, and what is left of it on disk: rank 0 decides whether to resume, the others follow
    fp = ckpt.fingerprint(train, model, seed, index_dir,
                          {"backbone": backbone, "world_size": dist_info.world_size, **(fingerprint_extra or {})})
    ck_dir = Path(out.checkpoints)
    last_path, best_path = ck_dir / "last.pt", ck_dir / "best.pt"
    state = ckpt.load_matching(last_path, fp) if main else None
    if main and state is None:
        for stale in [best_path, *ck_dir.glob("epoch_*.pt")]:
            if stale.exists():
                stale.unlink()
                log.info("removed %s of an earlier run", stale)
    if distributed.broadcast_object(state is not None) and not main:
        state = ckpt.load(last_path)

    # -- the batches: one training loader for the whole run (its persistent workers outlive the epochs)
    start_epoch, start_batch = (state["epoch"], state["batch_in_epoch"]) if state is not None else (0, 0)
    train_loader = None
    if train.overfit_batches > 0:  # N fixed batches, no augmentation, in index order; validated on themselves
        fixed = build_loader(train_split, training=False, limit_images=train.overfit_batches * bs, **loader_args)
        fixed_batches = list(fixed)
        batches_per_epoch = len(fixed_batches)
        val_split, gt_json = train_split, str(Path(index_dir) / "instances_train.json")
    else:
        train_loader = build_loader(train_split, training=True, epoch=start_epoch, skip_batches=start_batch,
                                    **loader_args)
        batches_per_epoch = len(train_loader)  # the same for every epoch and rank; skipping does not change it
        val_split, gt_json = None, str(Path(index_dir) / "instances_val.json")
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"train.grad_accum = {accum} exceeds the {batches_per_epoch} batches of an epoch "
                         f"(batch_size {bs}); lower train.grad_accum or train.batch_size")
    total_steps = train.max_steps if train.max_steps > 0 else train.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    val_on = train.val.interval > 0
    if (val_on or train.quick_eval.interval > 0) and val_split is None:
        val_split = load_split(index_dir, "val")
    val_limit = train.val.max_images
    if train.overfit_batches > 0:
        val_limit = min(val_limit or 10**9, train.overfit_batches * bs)

    # -- model, optimizer, schedule (same init on every rank; DDP also broadcasts rank 0's weights)
    seed_everything(seed)
    det = (model_fn or build_detector)(backbone, num_classes=len(categories) + 1, model=model,
                                       train_min_sizes=tuple(train.augment.multi_scale) or None)
    det.to(device)  # build_detector applies model.channels_last and model.compile (in place)
    optimizer = build_optimizer(det, train)
    schedule = Schedule(optimizer, train, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))
    monitor = Monitor.from_params(train)
    rows = {"batches": [], "epochs": [], "val": []}
    start_step = 0
    seconds_before, images_seen, images_skipped, resumed_from = 0.0, 0, 0, 0
    epoch_seconds = 0.0
    # summed on the device since the last log row: loss, 4 components, images, finite steps; then the epoch's
    # loss sum and finite steps (read back only at log rows and epoch ends: no per-step host sync for them)
    acc = torch.zeros(9, device=device)
    last_val_step, early_stopped = -1, False
    if state is not None:
        det.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        monitor.load_state_dict(state["monitor"])
        rows = {k: list(v) for k, v in state["csv"].items()}
        start_step = state["step"]
        seconds_before, images_seen, images_skipped = state["seconds"], state["images_seen"], state["images_skipped"]
        epoch_seconds, last_val_step, early_stopped = state["epoch_seconds"], state["last_val_step"], state["early_stopped"]
        acc = state["ranks"][dist_info.rank]["acc"].to(device)  # this rank's partial sums
        resumed_from = state["resumed_from_step"] if state["finished"] else start_step
        if not state["finished"]:
            log.info("resuming %s from step %d of %d (epoch %d, batch %d)", last_path, start_step, total_steps,
                     start_epoch, start_batch)
    n_params = count_parameters(det)
    csv_batches = CsvLog(out.train_batches_csv if main else None, BATCH_COLUMNS, rows["batches"])
    csv_epochs = CsvLog(out.train_epochs_csv if main else None, EPOCH_COLUMNS, rows["epochs"])
    csv_val = CsvLog(out.val_history_csv if main else None, VAL_COLUMNS, rows["val"])

    def summary(step: int, weights_from: str) -> dict:
        seconds = seconds_before + (time.perf_counter() - t_session)
        return {
            "backbone": backbone, "epochs": round(step / steps_per_epoch, 3), "steps": step, "total_steps": total_steps,
            "best_epoch": monitor.best_epoch if monitor.best_step >= 0 else None,
            "best_step": monitor.best_step if monitor.best_step >= 0 else None,
            "best_metric": monitor.best if monitor.best_step >= 0 else None, "monitor": train.val.monitor,
            "weights_from": weights_from, "early_stopped": early_stopped,
            "final_loss": csv_batches.rows[-1]["loss"] if csv_batches.rows else None,
            "seconds": seconds, "images_seen": images_seen, "images_per_s": images_seen / max(seconds, 1e-9),
            "peak_memory_mb": peak_memory_mb(device), "images_skipped": images_skipped,
            "nonfinite_steps": monitor.nonfinite_steps, "params": n_params, "lr": schedule.lr,
            "amp": amp, "device": device.type, "world_size": dist_info.world_size,
            "resumed_from_step": resumed_from,
        }

    def checkpoint_state(step, epoch, batch_in_epoch, ranks, finished=False, result=None) -> dict:
        """What last.pt holds; `ranks`: each rank's RNG streams and unlogged partial sums, in rank order."""
        return {
            "fingerprint": fp, "finished": finished, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "total_steps": total_steps, "model": det.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "monitor": monitor.state_dict(), "ranks": ranks,
            "csv": {"batches": csv_batches.rows, "epochs": csv_epochs.rows, "val": csv_val.rows},
            "seconds": seconds_before + (time.perf_counter() - t_session), "images_seen": images_seen,
            "images_skipped": images_skipped, "epoch_seconds": epoch_seconds,
            "last_val_step": last_val_step, "early_stopped": early_stopped, "resumed_from_step": resumed_from,
            "result": result or {},
        }

    def save_last(step, epoch, batch_in_epoch, finished=False, result=None):
        """Write last.pt (rank 0) and flush the CSVs; every rank calls it (it gathers each rank's own state)."""
        ranks = distributed.all_gather_object({"rng": ckpt.rng_state(), "acc": acc.cpu()})
        if main:
            ckpt.save(last_path, checkpoint_state(step, epoch, batch_in_epoch, ranks, finished, result))
            for c in (csv_batches, csv_epochs, csv_val):
                c.flush()

    def finish(result: dict) -> dict:
        """Final weights (best if validation ran, else last), train.json and the CSVs: rank 0 writes."""
        if main:
            if result["weights_from"] == "best":
                det.load_state_dict(ckpt.load(best_path)["model"])
            spec = {"format": "mitdet-detector-v1", "backbone": backbone, "num_classes": len(categories) + 1,
                    "categories": [{"id": c.id, "name": c.name, "label": c.label} for c in categories],
                    "model": to_dict(model), "weights_from": result["weights_from"], "step": result["steps"]}
            save_inference_model(det, spec, out.model_dir)
            for c in (csv_batches, csv_epochs, csv_val):
                c.flush()
            write_json(out.train_metrics, result)
            log.info("%s: %d steps in %.0f s (%.2f images/s); weights from %s.pt -> %s", backbone, result["steps"],
                     result["seconds"], result["images_per_s"], result["weights_from"], out.weights)
        distributed.barrier()
        return result

    t_session = time.perf_counter()
    if state is not None and state["finished"]:  # same params, data and code: rewrite the outputs from it
        log.info("%s holds a finished run matching these params: rewriting its outputs", last_path)
        return finish(dict(state["result"]))

    # -- from here on, only the training RNG streams (seeded per rank, or restored) shape the run
    if state is not None:
        ckpt.set_rng_state(state["ranks"][dist_info.rank]["rng"])  # this rank's own streams
    else:
        seed_everything(seed + dist_info.rank)
    ddp = distributed.wrap(det, dist_info, device)
    det.train()
    val_loader = qe_loader = val_gt = None
    if val_on and main:
        val_gt = load_coco(gt_json)  # once: every validation scores against it
    if val_split is not None:
        val_args = dict(loader_args, rank=0, world_size=1)  # rank 0 validates on every image
        if val_on:
            val_loader = build_loader(val_split, training=False, limit_images=val_limit, **val_args)
        if train.quick_eval.interval > 0:  # a few images: no worker processes kept for them
            qe_loader = build_loader(val_split, training=False, limit_images=train.quick_eval.samples,
                                     **{**val_args, "num_workers": 0})
    tb = TensorBoard(str(Path(out.model_dir) / "tensorboard") if (main and train.tensorboard) else None,
                     purge_step=start_step or None)
    bar = progress_bar(total_steps, start_step, enabled=main and sys.stderr.isatty())  # else: log lines
    params_to_clip = [p for g in optimizer.param_groups for p in g["params"]]

    def run_validation(step: int, epoch: int) -> tuple[dict | None, bool]:
        """Validate on rank 0, share the result; returns (AP dict, is_best) and may set early stopping."""
        nonlocal last_val_step, early_stopped
        result = None
        if main:
            result = validate(det, val_loader, device, amp, label_to_category, val_gt, step)
        result = distributed.broadcast_object(result)
        last_val_step = step
        is_best, stop = monitor.validated(result[train.val.monitor], step, epoch)
        schedule.observe(result[train.val.monitor])
        early_stopped = early_stopped or stop
        if main:
            csv_val.append({"step": step, "epoch": epoch, **result})
            if is_best:
                ckpt.save(best_path, {"model": det.state_dict(), "step": step, "epoch": epoch, "fingerprint": fp,
                                      "metric": result[train.val.monitor], "monitor": train.val.monitor})
        tb.scalars(step, {f"val/{k}": v for k, v in result.items()})
        return result, is_best

    # `epoch`: the 0-based epoch last begun (rows and checkpoints say epoch + 1); a run resumed after its last
    # epoch (early stopped, or stopped before its final validation) begins none
    step, epoch = start_step, start_epoch - 1
    epochs_left = range(start_epoch, num_epochs) if not early_stopped and step < total_steps else range(0)
    t_log = time.perf_counter()
    with StopFlag() as stop_flag, backbone_autocast(det, device, amp):  # heads in float32, as in evaluation
        try:
            for epoch in epochs_left:
                skip = start_batch if epoch == start_epoch else 0
                end = steps_per_epoch * accum  # trailing batches that do not fill an accumulation are left out
                t_epoch = time.perf_counter()
                with ckpt.preserved_rng():  # creating the iterator draws seeds: keep the training streams as they are
                    if train.overfit_batches > 0:
                        batches = iter(fixed_batches[skip:end])
                    elif skip >= end:
                        batches = iter(())
                    else:  # the sampler skips `skip` batches of the epoch it was built for (resume) only
                        train_loader.batch_sampler.set_epoch(epoch)
                        batches = iter(train_loader)
                batch_idx, micro, step_batch = skip, 0, skip  # step_batch: batches consumed at the last step
                step_loss = torch.zeros(5, device=device)
                for images, targets, skipped in until_stopped(batches, stop_flag):
                    if batch_idx >= end or step >= total_steps:
                        break
                    images_skipped += skipped
                    if not images:  # every image of the batch failed to decode (counted above)
                        batch_idx += 1
                        continue
                    images, targets = to_device(images, targets, device)
                    micro += 1
                    batch_idx += 1
                    sync = not dist_info.enabled or micro % accum == 0
                    with (contextlib.nullcontext() if sync else ddp.no_sync()):
                        try:
                            loss_dict = ddp(images, targets)
                            loss = sum(loss_dict.values())
                            scaler.scale(loss / accum).backward()
                        except torch.OutOfMemoryError:
                            raise RuntimeError(
                                f"CUDA out of memory at train.batch_size = {bs} (grad_accum {accum}): lower "
                                "train.batch_size and raise train.grad_accum to keep the effective batch") from None
                    step_loss += torch.stack([loss.detach().float()] +
                                             [loss_dict[k].detach().float() for k in LOSS_KEYS]) / accum
                    acc[5] += len(images)
                    images_seen += len(images) * dist_info.world_size
                    if micro % accum:
                        continue

                    # -- one optimizer step; one host sync to learn whether the loss was finite (and any stop)
                    flags = torch.stack([torch.isfinite(step_loss).all().float(),
                                         torch.tensor(float(stop_flag.signum is None), device=device)])
                    finite, keep_going = (bool(x) for x in distributed.all_reduce_min(flags).tolist())
                    lr_used = schedule.lr
                    if finite:
                        if train.clip_grad_norm > 0:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(params_to_clip, train.clip_grad_norm)
                        scaler.step(optimizer)
                        scaler.update()
                        acc[:5] += step_loss
                        acc[6] += 1
                        acc[7] += step_loss[0]
                        acc[8] += 1
                    optimizer.zero_grad(set_to_none=True)
                    schedule.step()
                    step += 1
                    step_batch = batch_idx
                    bar.update(1)
                    monitor.step_ok(finite, step, str(last_path))
                    step_loss.zero_()

                    if step % train.log_every_steps == 0 or step == total_steps:
                        sums = distributed.all_reduce_sum(acc[:7].clone()).tolist()
                        n_ok = sums[6]  # finite steps x ranks; none: the losses are empty, not 0
                        losses = {"loss": sums[0], **{k: sums[i + 1] for i, k in enumerate(LOSS_KEYS)}}
                        row = {"epoch": epoch + 1, "step": step, "lr": lr_used, "timestamp": now(),
                               "images_per_s": sums[5] / max(time.perf_counter() - t_log, 1e-9),
                               **{k: (v / n_ok if n_ok else None) for k, v in losses.items()}}
                        csv_batches.append(row)  # written at the next checkpoint save, epoch end or the end
                        if n_ok:
                            monitor.loss_logged(row["loss"], step)
                        shown = "-" if row["loss"] is None else f"{row['loss']:.4f}"
                        ema = "-" if monitor.loss_ema is None else f"{monitor.loss_ema:.4f}"
                        bar.set_postfix(loss=shown, ema=ema, lr=f"{lr_used:.2e}", img_s=f"{row['images_per_s']:.1f}",
                                        refresh=False)
                        if bar.disable:
                            eta = (total_steps - step) * (time.perf_counter() - t_session) / (step - start_step)
                            log.info("step %d/%d epoch %d: loss %s (avg %s) lr %.3g %.1f images/s ETA %s", step,
                                     total_steps, epoch + 1, shown, ema, lr_used,
                                     row["images_per_s"], time.strftime("%H:%M:%S", time.gmtime(eta)))
                        tb.scalars(step, {"train/" + k: row[k] for k in ["loss", *LOSS_KEYS, "lr", "images_per_s"]})
                        acc[:7] = 0
                        t_log = time.perf_counter()

                    if qe_loader is not None and main and step % train.quick_eval.interval == 0:
                        quick_eval(det, qe_loader, device, amp, label_to_category, names, train.quick_eval.top_k,
                                   step)
                    if val_on and train.val.unit == "steps" and step % train.val.interval == 0:
                        run_validation(step, epoch + 1)
                    if train.checkpoint.every_steps and step % train.checkpoint.every_steps == 0:
                        epoch_seconds, t_epoch = epoch_seconds + time.perf_counter() - t_epoch, time.perf_counter()
                        save_last(step, epoch, batch_idx)
                    requested = should_stop is not None and should_stop(step)
                    if (not keep_going or requested) and step < total_steps:
                        epoch_seconds, t_epoch = epoch_seconds + time.perf_counter() - t_epoch, time.perf_counter()
                        save_last(step, epoch, batch_idx)
                        raise Interrupted(step, stop_flag.signum)
                    if early_stopped or step >= total_steps or batch_idx >= end:
                        break

                if stop_flag.signum is not None and step_batch < end and step < total_steps:  # loader ended early
                    save_last(step, epoch, step_batch)
                    raise Interrupted(step, stop_flag.signum)

                # -- end of the epoch (or of the run within it)
                epoch_seconds += time.perf_counter() - t_epoch
                val, is_best = None, False
                full_epoch = batch_idx >= end
                if val_on and train.val.unit == "epochs" and full_epoch and (epoch + 1) % train.val.interval == 0 \
                        and last_val_step != step:
                    val, is_best = run_validation(step, epoch + 1)
                ck_name = last_path
                if main and train.checkpoint.keep > 0 and full_epoch:
                    ck_name = ck_dir / f"epoch_{epoch + 1:03d}.pt"
                loss_sum, n_ok = distributed.all_reduce_sum(acc[7:9].clone()).tolist()
                csv_epochs.append({
                    "epoch": epoch + 1, "avg_loss": loss_sum / n_ok if n_ok else None, "epoch_seconds": epoch_seconds,
                    "lr": schedule.lr,
                    "val_AP": val["AP"] if val else None, "val_AP50": val["AP50"] if val else None,
                    "is_best": int(is_best), "checkpoint": str(ck_name), "timestamp": now()})
                tb.scalars(step, {"epoch/avg_loss": csv_epochs.rows[-1]["avg_loss"]})
                acc[7:9], epoch_seconds = 0, 0.0
                save_last(step, epoch + 1, 0)
                if main and ck_name != last_path:
                    ckpt.copy(last_path, ck_name)
                    ckpt.prune_periodic(ck_dir, train.checkpoint.keep)
                if early_stopped or step >= total_steps:
                    break
                flags = torch.tensor([float(stop_flag.signum is None)], device=device)
                if not distributed.all_reduce_min(flags).item() or (should_stop is not None and should_stop(step)):
                    raise Interrupted(step, stop_flag.signum)

            # -- the end: a last validation if the final weights were not validated, then the outputs
            if val_on and last_val_step != step:
                run_validation(step, epoch + 1)
        finally:
            bar.close()
            tb.close()
    weights_from = "best" if monitor.best_step >= 0 else "last"
    result = summary(step, weights_from)
    save_last(step, epoch + 1, 0, finished=True, result=result)
    return finish(result)
