"""The training/evaluation dataset over an index split, its collate function and the DataLoader builder."""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import random
import select
import threading
import time

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mitdet.data.index import SplitIndex
from mitdet.data.sampler import GroupedBatchSampler, OrderedBatchSampler, aspect_ratio_groups
from mitdet.data.decode import READ_FLAGS, decode_array, decode_aux, decode_image  # noqa: F401 (READ_FLAGS: others import it from here)
from mitdet.data.transforms import build_transform
from mitdet.io import pid_alive
from mitdet.params import ModelParams, TrainParams

log = logging.getLogger(__name__)


class DetectionDataset(Dataset):
    """Item i (or (i, epoch) from the training sampler) -> (image float32 [3,H,W] 0..1, target), or None when the
    file cannot be decoded (`collate` counts those per batch: a counter here would only see the main process).
    With a transform for model.modality rgbx and records with `aux`: image [3 + N, H, W], aux channels 0..1 too."""

    def __init__(self, split: SplitIndex, transform):
        self.split = split
        self.records = split.images
        self.transform = transform
        self.use_aux = bool(getattr(transform, "use_aux", False))
        self.aux_channels = int(getattr(split, "aux_channels", 0) or 0)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rec = self.records[index]
        image, aux, reduce, why = self._decode(rec, index, epoch)
        if image is None:
            log.warning("skipping %s (image_id %d): the file %s", rec.file, rec.image_id, why)
            return None
        keep = ~rec.iscrowd  # crowd regions are evaluation-only
        extra = {} if aux is None and reduce == 1 else {"aux": aux, "orig": (rec.height, rec.width)}
        image, boxes, labels, scale, *rest = self.transform(image, rec.boxes[keep], rec.labels[keep], epoch, index,
                                                            **extra)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        if rest and rest[0] is not None:
            tensor = torch.cat([tensor, _aux_tensor(rest[0])])
        target = {"boxes": torch.from_numpy(boxes).reshape(-1, 4), "labels": torch.from_numpy(labels),
                  "image_id": rec.image_id, "orig_size": (rec.height, rec.width), "scale": float(scale)}
        return tensor, target

    def _decode(self, rec, index: int, epoch: int):
        """(RGB HxWx3 uint8, aux HxWxN or None, decode reduction, "") or (None, None, 1, why it cannot be used)."""
        aux_path = getattr(rec, "aux", None) if self.use_aux else None
        if self.use_aux and aux_path is None and self.aux_channels:
            return None, None, 1, f"has no auxiliary image (the index says {self.aux_channels} aux channels)"
        if aux_path is not None and aux_path == rec.file:  # one .npy: RGB in channels 0..2, aux in 3..
            image, aux, why = _split_array(rec, self.aux_channels)
            return image, aux, 1, why
        reduce = 1
        if hasattr(self.transform, "reduction") and not rec.file.endswith((".npy", ".png", ".PNG")):
            reduce = self.transform.reduction(rec.height, rec.width, epoch, index)
        image, why = decode_image(rec.file, rec.width, rec.height, reduce)
        if image is not None and image.shape[:2] != (rec.height, rec.width):
            reduced = (-(-rec.height // reduce), -(-rec.width // reduce))
            if reduce == 1 or image.shape[:2] != reduced:
                image, why = None, f"decodes to {image.shape[1]}x{image.shape[0]}, the index says {rec.width}x{rec.height}"
        if image is None or aux_path is None:
            return image, None, reduce, why
        aux, why = decode_aux(aux_path, rec.width, rec.height, self.aux_channels)
        if aux is None:
            return None, None, 1, f"has an auxiliary image {aux_path} that {why}"
        return image, aux, reduce, ""


def _split_array(rec, channels: int):
    """(RGB, aux, "") from one (H, W, 3 + N) uint8 `.npy`, or (None, None, why)."""
    array, why = decode_array(rec.file, rec.width, rec.height)
    if array is None:
        return None, None, why
    if array.dtype != np.uint8 or array.shape[2] < 4 or (channels and array.shape[2] != 3 + channels):
        expected = 3 + channels if channels else "3 + N"
        return None, None, f"holds {array.dtype} x {array.shape[2]} channels; expected uint8 x {expected}"
    return np.ascontiguousarray(array[:, :, :3]), np.ascontiguousarray(array[:, :, 3:]), ""


def _aux_tensor(aux: np.ndarray) -> torch.Tensor:
    """HxWxN uint8/uint16 -> float32 [N, H, W] in 0..1 (uint8 / 255, uint16 / 65535)."""
    scale = 65535.0 if aux.dtype == np.uint16 else 255.0
    return torch.from_numpy(np.ascontiguousarray(aux.transpose(2, 0, 1)).astype(np.float32)).div_(scale)


def collate(batch):
    """(images list, targets list, how many samples failed to decode and were dropped)."""
    kept = [b for b in batch if b is not None]
    return [b[0] for b in kept], [b[1] for b in kept], len(batch) - len(kept)


def _worker_init(worker_id: int, trainer_pid: int | None = None) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(1)  # workers are the parallelism; OpenCV's own threads would oversubscribe the cores
    if trainer_pid is not None:
        threading.Thread(target=_exit_with, args=(trainer_pid,), name="mitdet-trainer-watch", daemon=True).start()


def _exit_with(pid: int) -> None:
    """End this worker as soon as process `pid` (the trainer) is gone: at once with a pidfd, else within 1 s."""
    # PyTorch's own check watches the worker's parent, which is the forkserver here, and the forkserver only exits
    # once every worker has closed its end of the forkserver's pipe: after a kill -9 of the trainer both would
    # live on forever.
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # not Linux >= 5.3
        while pid_alive(pid):
            time.sleep(1.0)
        os._exit(1)
    poller = select.poll()  # (not select.select: it cannot take descriptors past 1023)
    poller.register(fd, select.POLLIN)
    poller.poll()  # readable once the process has exited
    os._exit(1)


def build_loader(split: SplitIndex, *, model: ModelParams, train: TrainParams | None, seed: int, training: bool,
                 batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 skip_batches: int = 0, limit_images: int = 0) -> DataLoader:
    """Training: aspect-grouped, seeded shuffle per epoch, augmentations reseeded from (seed, epoch, index),
    the first `skip_batches` of `epoch` skipped (resume). Eval: ordered, resize only, first `limit_images`."""
    if training:
        if train is None:
            raise ValueError("build_loader(training=True) needs the train params (train.augment)")
        dataset = DetectionDataset(split, build_transform(model, train.augment, seed))
        groups = aspect_ratio_groups([r.width for r in split.images], [r.height for r in split.images])
        sampler = GroupedBatchSampler(groups, batch_size, seed, rank=rank, world_size=world_size, epoch=epoch,
                                      skip_batches=skip_batches)
    else:
        dataset = DetectionDataset(split, build_transform(model, None, seed))
        sampler = OrderedBatchSampler(len(split.images), batch_size, limit=limit_images, rank=rank,
                                      world_size=world_size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=functools.partial(_worker_init, trainer_pid=os.getpid()) if num_workers > 0 else None,
                      generator=generator,
                      multiprocessing_context=_worker_context() if num_workers > 0 else None)


def _worker_context():
    """Workers start from a clean forkserver that has imported this module once, not from a fork of the
    trainer: a fork copies locks held by the parent's other threads (OpenCV's pool, tqdm's monitor, an HTTP
    server in tests), and a worker then hangs on its first cv2 call now and then."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx
