"""Operation counts and energy per image (DESIGN §6), by walking a model with forward hooks on a real forward pass.

Per image, every multiply-accumulate (MAC) of

- ``nn.Linear``: input elements × out features (bias not counted),
- ``nn.Conv2d``: kernel_h·kernel_w·in/groups per output element, plus one per output element for the bias,
- ``nn.LayerNorm`` (and subclasses): 2 × input elements,

counts as one multiplication and one addition. GELU, ReLU, dropout, pooling and the head's mean are not counted.
The attention products come from each attention module's own ``AttentionBase.count_ops(feat_size)``, called with
the ``feat_size`` its forward really received. Then

    energy_pj = mul_pj · mul + add_pj · add + bitop_pj · bitops

with mul_pj = 3.7 pJ and add_pj = 0.9 pJ (32-bit float multiply / add at 45 nm, the EcoFormer paper's constants).
A bitwise operation has no constant in the paper: ``bitop_pj`` = 0.1 pJ charges each one like a 32-bit integer add
at 45 nm. With these rules PVTv2-B0 at 224 px, 1000 classes gives the paper's figures: full MSA 2.02 G mul,
1.99 G add, 9.25e9 pJ; EcoFormer (stages 0-2) 0.54 G mul, 0.56 G add, 2.5e9 pJ.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn

from attention import AttentionBase, OpCount

log = logging.getLogger(__name__)

MUL_PJ = 3.7
ADD_PJ = 0.9
BITOP_PJ = 0.1


def energy_pj(mul: float, add: float, bitops: float = 0.0, mul_pj: float = MUL_PJ, add_pj: float = ADD_PJ,
              bitop_pj: float = BITOP_PJ) -> float:
    """mul_pj·mul + add_pj·add + bitop_pj·bitops, in pJ."""
    return mul_pj * mul + add_pj * add + bitop_pj * bitops


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one Linear / Conv2d / LayerNorm call on one batch (0 for other modules)."""
    if isinstance(module, nn.Linear):
        return inp.numel() * module.out_features
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        return out.numel() * (kernel + (module.bias is not None))
    if isinstance(module, nn.LayerNorm):
        return 2 * inp.numel()
    return 0


_COUNTED = (nn.Linear, nn.Conv2d, nn.LayerNorm)


def count_model_ops(model: nn.Module, img_size: Union[int, Sequence[int]], in_chans: int = 3,
                    mul_pj: float = MUL_PJ, add_pj: float = ADD_PJ, bitop_pj: float = BITOP_PJ) -> Dict[str, Any]:
    """Count one forward pass of one ``img_size`` image through ``model`` (eval mode, no grad).

    Returns ``params``, ``macs`` (Linear/Conv2d/LayerNorm), ``attn_mul``/``attn_add``/``bitops`` (sum of the
    attention modules' ``count_ops``), ``mul`` = macs + attn_mul, ``add`` = macs + attn_add, ``energy_pj``, and
    ``attention``: {module name: {"feat_size", "mul", "add", "bitops"}} in forward order, and ``uncalled_layers``:
    names of Linear/Conv2d/LayerNorm modules the forward never called (their operations are missing: a forward
    that uses a layer's weight directly, e.g. in a fused product, must call the module instead to be counted).
    """
    H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    names = {m: n for n, m in model.named_modules()}
    macs = 0
    called: set = set()
    attention: Dict[str, Dict[str, Any]] = {}

    def on_layer(module: nn.Module, args: Tuple[Any, ...], out: torch.Tensor) -> None:
        nonlocal macs
        macs += layer_macs(module, args[0], out)
        called.add(module)

    def on_attention(module: AttentionBase, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> None:
        feat_size = tuple(int(s) for s in (args[1] if len(args) > 1 else kwargs["feat_size"]))
        ops: OpCount = module.count_ops(feat_size)
        attention[names[module]] = dict(feat_size=list(feat_size), mul=ops.mul, add=ops.add, bitops=ops.bitops)

    handles = []
    inside_attention = set()
    for module in model.modules():
        if isinstance(module, AttentionBase):
            handles.append(module.register_forward_hook(on_attention, with_kwargs=True))
            inside_attention.update(module.modules())
    for name, module in model.named_modules():
        if isinstance(module, _COUNTED):
            handles.append(module.register_forward_hook(on_layer))
        elif (module not in inside_attention and not any(True for _ in module.children())
              and any(True for _ in module.parameters(recurse=False))):
            log.warning("module %s (%s) has parameters but no counting rule: its operations are not counted",
                        name, type(module).__name__)
    if not inside_attention:
        log.warning("no AttentionBase modules in %s: attention products are not counted", type(model).__name__)
    ref = next(model.parameters())
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, H, W, device=ref.device, dtype=ref.dtype))
    finally:
        for module, training in modes:
            module.training = training
        for handle in handles:
            handle.remove()
    uncalled = [n for n, m in model.named_modules() if isinstance(m, _COUNTED) and m not in called]
    if uncalled:
        log.warning("layers never called as modules in the forward (e.g. weights used in a fused product), their "
                    "operations are not counted: %s", ", ".join(uncalled))
    attn_mul = sum(a["mul"] for a in attention.values())
    attn_add = sum(a["add"] for a in attention.values())
    bitops = sum(a["bitops"] for a in attention.values())
    mul, add = macs + attn_mul, macs + attn_add
    return dict(params=sum(p.numel() for p in model.parameters()), macs=macs, mul=mul, add=add, bitops=bitops,
                attn_mul=attn_mul, attn_add=attn_add, energy_pj=energy_pj(mul, add, bitops, mul_pj, add_pj, bitop_pj),
                attention=attention, uncalled_layers=uncalled)
