"""The reference loop behind the CIFAR-100 CPU protocol's bar (README "Results on real data").

A plain PyTorch loop, independent of train.py, Hydra and this project's model: timm's `pvt_v2_b0`, AdamW (lr 1e-3,
weight decay 0.05 on every parameter), torch's OneCycleLR stepped per batch, batch 128, random crop (4 px padding)
+ flip, label smoothing 0.1, drop path 0.1, 8 epochs at 32 px. Run it on the machine that runs
`experiment=cifar100_cpu` to compare accuracy and time per epoch in the same conditions:

    python scripts/cifar100_bar.py --root data [--epochs 8] [--out runs/cifar100_bar.jsonl]

Prints one JSON line per epoch (train loss, val top-1/top-5, seconds) and appends it to --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402

from engine.data import CIFAR100  # noqa: E402  (reads re-pickled copies too: torchvision insists on the md5)

log = logging.getLogger("cifar100_bar")
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder that holds cifar-100-python/")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the per-epoch JSON lines here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (Path(args.root) / "cifar-100-python").is_dir():
        raise SystemExit(f"no cifar-100-python/ under {args.root}: export it with "
                         f"python ../shared/data/cifar100_export.py --out {args.root} --layout pickle")
    torch.manual_seed(args.seed)

    normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *normalize])
    train_set = CIFAR100(args.root, train=True, transform=train_tf)
    val_set = CIFAR100(args.root, train=False, transform=transforms.Compose(normalize))
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
                              persistent_workers=args.workers > 0)
    val_loader = DataLoader(val_set, 2 * args.batch_size, num_workers=args.workers)

    model = timm.create_model("pvt_v2_b0", num_classes=100, drop_path_rate=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    for epoch in range(args.epochs):
        model.train()
        start, loss_sum = time.perf_counter(), 0.0
        for images, targets in train_loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
        seconds = time.perf_counter() - start
        model.eval()
        top1 = top5 = 0
        with torch.inference_mode():
            for images, targets in val_loader:
                best5 = model(images).topk(5, dim=1).indices
                top1 += (best5[:, 0] == targets).sum().item()
                top5 += (best5 == targets[:, None]).any(dim=1).sum().item()
        record = {"epoch": epoch, "train_loss": loss_sum / len(train_loader), "seconds": seconds,
                  "val_top1": 100.0 * top1 / len(val_set), "val_top5": 100.0 * top5 / len(val_set)}
        print(json.dumps(record), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
