"""Datasets, transforms, loaders and mixup for train.py / eval.py (``data`` config group).

``cifar100``: the official ``cifar-100-python`` layout (torchvision download, or an offline copy whose md5 sums may
differ from the release); ``imagenet`` / ``folder``: ImageFolder trees ``root/train/<class>/*``, ``root/val/<class>/*``
(class index = the training split's sorted folder names, used for the validation split too; images of every Pillow
mode converted to 8-bit RGB by :func:`to_rgb`); ``fake``: random images for smoke runs.
Transforms, mixup/cutmix, label smoothing and random erasing are timm's.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data import auto_augment as timm_auto_augment
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms

log = logging.getLogger(__name__)

DATASETS = ("cifar100", "imagenet", "folder", "fake")
class DataError(ValueError):
    """Data that cannot be read as configured; the message names the file or folder and the fix."""


CIFAR_HINT = ("get it with data.download=true (needs network), or write an offline copy with "
              "`python ../shared/data/cifar100_export.py --out DIR --layout pickle` and pass data.root=DIR")


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's RandAugment posterize, keeping the result of Pillow < 13 for 0 bits (a black image): RandAugment
    with increasing magnitude (``inc1``) asks for 0 bits, which Pillow 13 refuses with a ValueError."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    timm_auto_augment.NAME_TO_OP[_name] = _posterize


# datasets -------------------------------------------------------------------------------------------------------
class CIFAR100(Dataset):
    """CIFAR-100 from ``root/cifar-100-python/{train,test}`` (official pickle layout), fine labels.

    Unlike ``torchvision.datasets.CIFAR100`` it accepts copies whose md5 sums differ from the official release
    (re-pickled exports), with a warning.
    """

    def __init__(self, root: str, train: bool, transform: Optional[Callable] = None, download: bool = False) -> None:
        if download:
            datasets.CIFAR100(root, train=train, download=True)
        folder = os.path.join(root, "cifar-100-python")
        path = os.path.join(folder, "train" if train else "test")
        if not os.path.isfile(path):
            raise DataError(f"CIFAR-100 not found: looked for {os.path.abspath(path)}; {CIFAR_HINT}")
        official = dict(datasets.CIFAR100.train_list + datasets.CIFAR100.test_list)
        with open(path, "rb") as f:
            raw = f.read()
        if hashlib.md5(raw).hexdigest() != official["train" if train else "test"]:
            log.warning("%s: md5 differs from the official CIFAR-100 release (a re-pickled copy?); reading it anyway",
                        path)
        entry = pickle.loads(raw, encoding="latin1")
        self.data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets: List[int] = list(entry["fine_labels"])
        meta = os.path.join(folder, "meta")
        self.classes: List[str] = (pickle.load(open(meta, "rb"), encoding="latin1")["fine_label_names"]
                                   if os.path.isfile(meta) else [str(i) for i in range(100)])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


WHITE = (255, 255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, reading values as they are meant: 16-bit modes (``I;16*``, and ``I``, Pillow's
    mode for 16- and 32-bit integer files) scaled by 255/65535, float (``F``) scaled from [0, 1] (both rounded, values
    outside the range saturate); transparency (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, a palette or colour key
    with ``transparency``) composited onto white, as viewers show it, rather than revealing the colours stored under
    transparent pixels; ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` by Pillow's conversion.
    Always a new, loaded image (independent of the file it was opened from)."""
    if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16"):
        scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("La", "RGBa"):  # premultiplied alpha
        img = img.convert(img.mode.upper())
    if img.mode in ("LA", "PA", "RGBA") or "transparency" in img.info:
        return Image.alpha_composite(Image.new("RGBA", img.size, WHITE), img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images raise an error naming the file, or (``skip_bad_images``) are replaced
    by the next readable sample and counted in ``bad_images`` (shared across loader workers).

    ``classes`` (the training split's class names, in label order) numbers this split's class folders the same way:
    a folder unknown to it is an error listing it, a class without a folder here is a warning.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, skip_bad_images: bool = False,
                 classes: Optional[Sequence[str]] = None) -> None:
        self.index_classes = None if classes is None else list(classes)
        if not os.path.isdir(root):
            raise DataError(f"dataset folder {os.path.abspath(root)} does not exist; expected "
                                    f"{root}/<class>/<image> (set data.root to the folder holding train/ and val/)")
        try:
            super().__init__(root, transform=transform, allow_empty=classes is not None)
        except FileNotFoundError as err:
            raise DataError(f"no images found under {os.path.abspath(root)} ({err}); expected "
                                    f"{root}/<class>/<image>.jpg|png") from None
        self.skip_bad_images = skip_bad_images
        self.bad_images = mp.Value("i", 0)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        found, index = super().find_classes(directory)
        if self.index_classes is None:
            return found, index
        unknown = sorted(set(found) - set(self.index_classes))
        if unknown:
            raise DataError(f"{directory} has {len(unknown)} class folder(s) that the training split lacks: "
                            f"{', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''}; labels must mean the "
                            "same in both splits: add them to the training split or remove them here")
        missing = sorted(set(self.index_classes) - set(found))
        if missing:
            log.warning("%s lacks %d training class(es): %s (scored with the training split's labels)", directory,
                        len(missing), ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        return self.index_classes, {name: i for i, name in enumerate(self.index_classes)}

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                with open(path, "rb") as f:
                    img = to_rgb(Image.open(f))
            except Exception as err:  # PIL raises many kinds for corrupt files
                if not self.skip_bad_images:
                    raise DataError(f"cannot read image {path}: {err}; remove or replace the file, or set "
                                       "data.skip_bad_images=true to skip and count such files") from err
                with self.bad_images.get_lock():
                    self.bad_images.value += 1
                log.warning("skipping unreadable image %s (%s)", path, err)
                continue
            return (self.transform(img) if self.transform else img), target
        raise DataError(f"no readable image in {self.root}")


def _first_per_class(targets: Sequence[int], per_class: int) -> List[int]:
    seen: Dict[int, int] = {}
    keep = []
    for i, t in enumerate(targets):
        if seen.get(t, 0) < per_class:
            keep.append(i)
            seen[t] = seen.get(t, 0) + 1
    return keep


def build_dataset(cfg: Any, train: bool, transform: Optional[Callable],
                  classes: Optional[Sequence[str]] = None) -> Dataset:
    """The train or validation split of ``cfg`` (the ``data`` node), optionally cut to ``per_class`` images/class.
    ``classes``: the label order of folder datasets (the training split's :func:`class_names`); None: this split's
    sorted folder names."""
    name = cfg.name
    if name == "cifar100":
        ds: Dataset = CIFAR100(cfg.root, train, transform, download=bool(cfg.get("download", False)))
        targets = ds.targets
    elif name in ("imagenet", "folder"):
        split = cfg.get("train_dir", "train") if train else cfg.get("val_dir", "val")
        hint = "" if name == "folder" else " (ImageNet-1K: root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG)"
        if cfg.root is None or not os.path.isdir(os.path.join(cfg.root, split)):
            raise DataError(f"{name} split not found: looked for {os.path.abspath(os.path.join(str(cfg.root), split))}"
                                    f"; set data.root to the folder holding {split}/<class>/<image>{hint}")
        ds = CheckedImageFolder(os.path.join(cfg.root, split), transform, bool(cfg.get("skip_bad_images", False)),
                                classes)
        targets = ds.targets
    elif name == "fake":
        size = cfg.train_size if train else cfg.val_size
        ds = datasets.FakeData(size, (3, cfg.img_size, cfg.img_size), cfg.num_classes, transform,
                               random_offset=0 if train else 10 ** 6)
        targets = None
    else:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if cfg.get("per_class") and targets is not None:
        ds = Subset(ds, _first_per_class(targets, int(cfg.per_class)))
    if len(ds) == 0:
        raise DataError(f"dataset {name} ({'train' if train else 'val'}) at {cfg.get('root')} is empty")
    return ds


def class_names(dataset: Dataset) -> Optional[List[str]]:
    """Class names in label order (CIFAR-100's, a folder dataset's index), or None (fake data)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return list(base.classes) if hasattr(base, "classes") else None


def num_classes_of(cfg: Any, dataset: Dataset) -> int:
    """``data.num_classes``, or the number of classes of ``dataset`` (class folders) with num_classes=null; more
    classes than ``data.num_classes`` is an error (labels beyond the model's head)."""
    names = class_names(dataset)
    if not cfg.get("num_classes"):
        return len(names)
    if names is not None and len(names) > int(cfg.num_classes):
        raise DataError(f"data.num_classes={cfg.num_classes} but data={cfg.name} at {cfg.get('root')} has "
                        f"{len(names)} classes; set data.num_classes=null (count the class folders) or {len(names)}")
    return int(cfg.num_classes)


# transforms -----------------------------------------------------------------------------------------------------
def build_transform(cfg: Any, train: bool) -> Callable:
    """timm transforms. ``aug.crop=rrc``: timm's RandomResizedCrop pipeline; ``pad``: CIFAR-style random crop with
    img_size/8 padding + flip (+ RandAugment and random erasing from timm when set). Eval: resize to
    img_size/crop_pct, centre crop."""
    size, aug = int(cfg.img_size), cfg.aug
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if not train:
        return create_transform(size, is_training=False, interpolation=cfg.interpolation, mean=mean, std=std,
                                crop_pct=cfg.crop_pct)
    if aug.crop == "rrc":
        return create_transform(size, is_training=True, scale=tuple(aug.scale), hflip=aug.hflip,
                                color_jitter=aug.color_jitter or 0.0, auto_augment=aug.auto_augment,
                                interpolation=cfg.interpolation, mean=mean, std=std, re_prob=aug.reprob,
                                re_mode="pixel")
    if aug.crop != "pad":
        raise ValueError(f"unknown data.aug.crop {aug.crop!r}; valid: pad, rrc")
    steps: List[Callable] = []
    if size != 32:
        steps.append(transforms.Resize(size, interpolation=transforms.InterpolationMode(cfg.interpolation)))
    steps += [transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip(aug.hflip)]
    if aug.color_jitter:
        steps.append(transforms.ColorJitter(*(3 * [float(aug.color_jitter)])))
    if aug.auto_augment:
        steps.append(rand_augment_transform(aug.auto_augment, dict(translate_const=int(size * 0.45),
                                                                   img_mean=tuple(round(255 * m) for m in mean))))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if aug.reprob > 0:
        steps.append(RandomErasing(aug.reprob, mode="pixel", device="cpu"))
    return transforms.Compose(steps)


def build_mixup(cfg: Any, num_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix (with label smoothing folded into the soft targets), or None when both are off."""
    aug = cfg.aug
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                 switch_prob=aug.mixup_switch_prob, label_smoothing=aug.smoothing, num_classes=num_classes)


# loaders --------------------------------------------------------------------------------------------------------
def build_loader(cfg: Any, dataset: Dataset, train: bool, rank: int, world_size: int, seed: int) -> DataLoader:
    """Training: shuffled by (seed, epoch) through a DistributedSampler (also for one process, so a resumed run
    sees the same order); call ``loader.sampler.set_epoch(e)``. Validation: every world_size-th image per rank,
    without padding, so reduced metrics count each image exactly once."""
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        batch = int(cfg.batch_size)
    else:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
        sampler = None
        batch = int(cfg.get("eval_batch_size") or 2 * cfg.batch_size)
    workers = int(cfg.num_workers)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=bool(cfg.pin_memory) and torch.cuda.is_available(), drop_last=train,
                      persistent_workers=False)  # workers re-seeded from the main RNG each epoch: exact resume


def bad_image_count(dataset: Dataset) -> int:
    """Images skipped so far (``data.skip_bad_images=true``)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return int(base.bad_images.value) if isinstance(base, CheckedImageFolder) else 0
