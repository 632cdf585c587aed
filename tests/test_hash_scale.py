"""The hash fit keeps the straight-through gradient alive (rows of A rescaled to RMS(y) = target_rms), on real
CIFAR-100 features of a briefly trained pvtv2_b0: same codes as the unscaled fit, >= 50% of pre-sign values in
the STE window |y| <= 1 after each of 5 consecutive fits, and the task-loss gradient reaching the EcoFormer
layers' qk.weight (all layers together) after 1 and after 5 fits within 2x of its norm before the first fit
(without rescaling A grows with every fit and fewer, larger gradients pass)."""
import copy
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401 (registers pvtv2_*)
from hashing import HashLearningCallback, KernelizedHash, fit_hash
from helpers import SHARED_DATA

IMG = 64


@pytest.fixture(scope="module")
def trained():
    path = os.path.join(SHARED_DATA, "cifar100.npz")
    if not os.path.isfile(path):
        pytest.skip(f"real CIFAR-100 not found at {SHARED_DATA}")
    data = np.load(path)
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(1, 3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(1, 3, 1, 1)
    x = torch.from_numpy(data["x_train"][:160]).permute(0, 3, 1, 2).float().div(255)
    x = F.interpolate((x - mean) / std, size=IMG, mode="bilinear", align_corners=False)
    y = torch.from_numpy(data["y_train"][:160].astype(np.int64))
    torch.manual_seed(0)
    model = timm.create_model("pvtv2_b0", attn="ecoformer", num_classes=100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(4):  # a few steps on real images, so the features are not those of random weights
        batch = slice(32 + 32 * step, 64 + 32 * step)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return model, x[:4], x[16:48], y[16:48]


def hash_inputs(model, images):
    """{hash module: its pre-sign values y (..., H, b)} on ``images`` (eval mode)."""
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.__setitem__(mod, mod.project(args[0])))
             for m in model.modules() if isinstance(m, KernelizedHash)]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return captured


def codes(model, images):
    return [torch.copysign(torch.ones(()), y) for y in hash_inputs(model, images).values()]


def qk_grad_norm(model, images, labels):
    """Norm of the cross-entropy gradient at every EcoFormer qk.weight together (W_qk feeds only the hash, so all
    of it passed through the straight-through sign)."""
    model.eval()  # deterministic forward (no drop path); gradients still flow
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    return torch.cat([m.qk.weight.grad.flatten() for _, m in model.attention_modules()
                      if m.attn_name == "ecoformer"]).norm()


def test_rescaled_fit_keeps_ste_gradient(trained):
    model, fit_images, grad_images, grad_labels = trained
    model = copy.deepcopy(model)
    scaled = HashLearningCallback(fit_images, max_tokens=64, steps=25, seed=0)
    unscaled = HashLearningCallback(fit_images, max_tokens=64, steps=25, seed=0, target_rms=None)
    grad_before = qk_grad_norm(model, grad_images, grad_labels)
    for fit in range(5):
        if fit in (0, 4):
            reference = copy.deepcopy(model)  # the same starting hash, fitted without rescaling
            unscaled.fit(reference, fit)
        stats = scaled.fit(model, fit)
        if fit in (0, 4):
            for ours, theirs in zip(codes(model, fit_images), codes(reference, fit_images)):
                assert torch.equal(ours, theirs)  # rescaling never changes a code
        shares = [(y.abs() <= 1).float().mean().item() for y in hash_inputs(model, fit_images).values()]
        assert min(shares) >= 0.5, shares
        assert [round(s["ste_share_after"], 4) for s in stats.values()] == pytest.approx(shares, abs=0.03)  # stats: the 64 fitted tokens
        if fit in (0, 4):
            ratio = (qk_grad_norm(model, grad_images, grad_labels) / grad_before).item()
            assert 0.5 <= ratio <= 2.0, ratio


def test_unscaled_fit_leaves_the_window():
    """What the rescaling fixes: the default fit (100 Adam steps per bit) without it leaves most pre-sign values
    outside |y| <= 1, so the share check above could fail."""
    units = torch.nn.functional.normalize(torch.randn(4, 64, 2, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    shares = {}
    for target_rms in (None, 0.6):
        hash_fn = KernelizedHash(2, 16, bits=8, anchors=10)
        torch.manual_seed(0)
        hash_fn.projection.normal_()
        stats = fit_hash(hash_fn, units, pairs=4, generator=torch.Generator().manual_seed(0), target_rms=target_rms)
        shares[target_rms] = stats.ste_share_after
    assert shares[None] < 0.5 <= shares[0.6], shares
