"""Data: the offline CIFAR-100 reader, transforms, the per-rank validation split, mixup."""
import logging
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from engine.data import CIFAR100, build_dataset, build_loader, build_mixup, build_transform
from helpers import ROOT, SHARED_DATA, export_cifar

CIFAR_CFG = OmegaConf.load(os.path.join(ROOT, "configs", "data", "cifar100.yaml"))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return str(export_cifar(tmp_path_factory.mktemp("c100"), "pickle", 3))


def test_offline_cifar_copy_with_other_md5_is_read_with_a_warning(cifar_root, caplog):
    with caplog.at_level(logging.WARNING):
        train = CIFAR100(cifar_root, train=True)
    assert "md5 differs" in caplog.text
    assert len(train) == 300 and sorted(set(train.targets)) == list(range(100))
    reference = np.load(os.path.join(SHARED_DATA, "cifar100.npz"))
    first = int(np.flatnonzero(reference["y_train"] == train.targets[0])[0])
    assert np.array_equal(np.asarray(train[0][0]), reference["x_train"][first])
    assert train.classes[:2] == ["apple", "aquarium_fish"]


def test_cifar_per_class_subset_and_transforms(cifar_root):
    cfg = OmegaConf.merge(CIFAR_CFG, {"root": cifar_root, "per_class": 2})
    train = build_dataset(cfg, True, build_transform(cfg, train=True))
    val = build_dataset(cfg, False, build_transform(cfg, train=False))
    assert len(train) == 200 and len(val) == 200
    image, label = train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 100
    assert torch.equal(val[5][0], val[5][0])  # eval transform is deterministic
    resized = OmegaConf.merge(cfg, {"img_size": 64})
    assert build_dataset(resized, True, build_transform(resized, train=True))[0][0].shape == (3, 64, 64)


def test_validation_split_covers_every_image_once_across_ranks():
    dataset = list(range(11))
    cfg = OmegaConf.create({"batch_size": 2, "eval_batch_size": None, "num_workers": 0, "pin_memory": False})
    seen = []
    for rank in range(3):
        for batch in build_loader(cfg, dataset, False, rank, 3, seed=0):
            seen += batch.tolist()
    assert sorted(seen) == dataset


def test_training_order_depends_on_seed_and_epoch_only():
    dataset = list(range(40))
    cfg = OmegaConf.create({"batch_size": 4, "num_workers": 0, "pin_memory": False})

    def order(epoch, seed=0):
        loader = build_loader(cfg, dataset, True, 0, 1, seed)
        loader.sampler.set_epoch(epoch)
        return [x for batch in loader for x in batch.tolist()]

    assert order(1) == order(1) and order(1) != order(2) and order(1, seed=1) != order(1)


def test_randaugment_with_increasing_posterize_never_fails():
    """rand-m10-mstd0.5-inc1 asks posterize for 0 bits, which Pillow 13 refuses; the pipeline must not."""
    augment = rand_augment_transform("rand-m10-mstd0.5-inc1", {"translate_const": 14})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for _ in range(500):
        augment(image)


def test_mixup_gives_soft_targets():
    cfg = OmegaConf.merge(CIFAR_CFG, {"aug": {"mixup": 0.8, "cutmix": 1.0}})
    mixup = build_mixup(cfg, 100)
    images, targets = mixup(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert targets.shape == (4, 100) and torch.allclose(targets.sum(1), torch.ones(4))
    assert build_mixup(CIFAR_CFG, 100) is None
