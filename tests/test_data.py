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
from helpers import ROOT, SHARED_DATA, export_cifar, run

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


# every Pillow mode as the RGB image it shows -------------------------------------------------------------------
def _composite(rgb, alpha):
    """Reference: ``rgb`` over white with ``alpha`` (uint8), rounded."""
    a = alpha[..., None] / 255.0
    return np.rint(rgb * a + 255.0 * (1 - a))


def _mode_cases():
    """(mode, image, reference RGB as float array, file format to round-trip it through or None)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    grey, alpha = rgb[..., 0], rng.integers(0, 256, (6, 5), dtype=np.uint8)
    wide, real = rng.integers(0, 65536, (6, 5)).astype(np.uint16), rng.random((6, 5)).astype(np.float32)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (6, 5), dtype=np.uint8)
    paletted = Image.fromarray(index, "P")
    paletted.putpalette(palette.flatten().tolist())
    keyed = paletted.copy()
    keyed.info["transparency"] = 3  # palette entry 3 is transparent
    with_alpha = paletted.copy()
    with_alpha.putalpha(Image.fromarray(alpha))
    y, cb, cr = (rgb[..., i].astype(float) for i in range(3))
    ycbcr = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                      y + 1.772 * (cb - 128)], -1)
    import colorsys

    hsv = np.array([[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in rgb]) * 255
    c, m, yy, k = (np.dstack([rgb, alpha])[..., i].astype(float) for i in range(4))
    cmyk = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - yy) * (255 - k)], -1) / 255
    stack = lambda g: np.repeat(np.asarray(g, float)[..., None], 3, -1)  # noqa: E731
    return [
        ("1", Image.fromarray(grey > 127), stack((grey > 127) * 255), "png"),
        ("L", Image.fromarray(grey), stack(grey), "png"),
        ("LA", Image.fromarray(np.dstack([grey, alpha]), "LA"), _composite(stack(grey), alpha), "png"),
        ("La", Image.fromarray(np.dstack([grey, alpha]), "LA").convert("La"), _composite(stack(grey), alpha), None),
        ("RGB", Image.fromarray(rgb), rgb.astype(float), "png"),
        ("P", paletted, palette[index].astype(float), "png"),
        ("P", keyed, np.where((index == 3)[..., None], 255.0, palette[index]), "png"),
        ("PA", with_alpha, _composite(palette[index], alpha), None),
        ("RGBA", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), _composite(rgb, alpha), "png"),
        ("RGBa", Image.fromarray(np.dstack([rgb, alpha]), "RGBA").convert("RGBa"), _composite(rgb, alpha), None),
        ("CMYK", Image.fromarray(np.dstack([rgb, alpha]), "CMYK"), cmyk, "tiff"),
        ("YCbCr", Image.fromarray(rgb, "YCbCr"), np.clip(ycbcr, 0, 255), "tiff"),
        ("HSV", Image.fromarray(rgb, "HSV"), hsv, None),
        ("I;16", Image.fromarray(wide), stack(np.rint(wide / 65535 * 255)), "png"),
        ("I;16B", Image.fromarray(wide.astype(">u2")), stack(np.rint(wide / 65535 * 255)), "tiff"),
        ("I", Image.fromarray(wide.astype(np.int32)), stack(np.rint(wide / 65535 * 255)), "tiff"),
        ("F", Image.fromarray(real), stack(np.rint(real * 255)), "tiff"),
    ]


def test_every_pillow_mode_reads_as_the_reference_rgb_image(tmp_path):
    """16-bit and float images scaled (Pillow's convert would clip them to white / black), transparency over
    white, through to_rgb and through the folder dataset's reader (files saved in that mode)."""
    from engine.data import CheckedImageFolder, to_rgb

    cases = _mode_cases()
    (tmp_path / "c").mkdir()
    files = {}
    for i, (mode, image, reference, fmt) in enumerate(cases):
        assert image.mode == mode
        result = to_rgb(image)
        assert result.mode == "RGB" and np.asarray(result).dtype == np.uint8
        tolerance = 3 if mode in ("YCbCr", "HSV") else 1  # Pillow's fixed-point colour maths
        np.testing.assert_allclose(np.asarray(result, dtype=float), reference, atol=tolerance, err_msg=mode)
        if fmt:
            files[f"{i:02d}.{fmt}"] = i
            image.save(tmp_path / "c" / f"{i:02d}.{fmt}")
    dataset = CheckedImageFolder(str(tmp_path))
    assert len(dataset) == len(files)
    for (path, _), (image, _) in zip(dataset.samples, (dataset[j] for j in range(len(dataset)))):
        mode, _, reference, _ = cases[files[os.path.basename(path)]]
        assert Image.open(path).mode == mode
        tolerance = 3 if mode == "YCbCr" else 1
        np.testing.assert_allclose(np.asarray(image, dtype=float), reference, atol=tolerance, err_msg=path)


# one class index for both splits -------------------------------------------------------------------------------
def _image_tree(root, splits):
    """``{split: [class, ...]}`` -> two tiny PNGs per class folder."""
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(root / split / name / f"{i}.png")
    return root


def test_validation_labels_follow_the_training_class_index(tmp_path, caplog):
    from engine.data import DataError, class_names

    root = _image_tree(tmp_path, {"train": ["ant", "bee", "cat"], "val": ["ant", "cat"], "val_extra": ["ant", "dog"]})
    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(ROOT, "configs", "data", "imagenet.yaml")),
                          {"name": "folder", "root": str(root), "num_classes": None, "val_dir": "val"})
    train = build_dataset(cfg, True, None)
    with caplog.at_level(logging.WARNING):
        val = build_dataset(cfg, False, None, class_names(train))
    assert "lacks 1 training class(es): bee" in caplog.text
    assert sorted(set(val.targets)) == [0, 2] and val.classes == ["ant", "bee", "cat"]  # cat stays 2, not 1
    with pytest.raises(DataError, match="1 class folder.* that the training split lacks: dog"):
        build_dataset(OmegaConf.merge(cfg, {"val_dir": "val_extra"}), False, None, class_names(train))


def test_a_val_class_unknown_to_training_stops_train_py_before_any_training(tmp_path):
    """It used to crash with `IndexError: Target 2 is out of bounds` after a whole training epoch."""
    root = _image_tree(tmp_path / "data", {"train": ["ant", "bee"], "val": ["ant", "bee", "cat"]})
    run_dir = tmp_path / "run"
    code, out, err = run("train.py", "data=folder", f"data.root={root}", "data.img_size=32", "data.batch_size=2",
                         "data.num_workers=0", "epochs=1", "device=cpu", f"hydra.run.dir={run_dir}",
                         env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2 and "that the training split lacks: cat" in out and "Traceback" not in out + err
    assert os.listdir(run_dir) == []  # nothing written (Hydra made the folder)
