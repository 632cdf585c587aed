"""PVTv2 ("PVT v2: Improved Baselines with Pyramid Vision Transformer") with pluggable attention (DESIGN §1).

A four-stage pyramid: overlapping patch embedding (stage 0: conv k7 s4; stages 1-3: conv k3 s2; + LayerNorm),
``depth[i]`` pre-norm blocks ``x = x + DropPath(Attn(LN(x)))``, ``x = x + DropPath(MLP(LN(x)))``, a LayerNorm,
and a mean-pooled linear head. The attention of each block comes from the registry in ``attention/``
(``attn=softmax|bitformer|ecoformer``), in the stages named by ``attn_stages``; other stages use softmax SRA.

Module and parameter names equal timm's ``pvt_v2`` so that, with ``attn="softmax"``, timm's state dicts (and the
original PVT repository's, through timm's ``checkpoint_filter_fn``) load unchanged and compute the same function.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from attention import AttentionBase, create_attention, get_attention_class

from .weights import to_timm_names, weight_layout

_logger = logging.getLogger(__name__)

MIN_INPUT_SIZE = 32


class MlpWithDepthwiseConv(nn.Module):
    """fc1 -> [ReLU if linear] -> depthwise 3x3 conv on the token grid -> GELU -> fc2. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, extra_relu: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        # channels-last weight strides (the same memory: the weight's second dim has size 1) make the convolution
        # read the (B, N, C) tokens in place as NHWC and write NHWC, which is (B, N, C) again; with timm's strides
        # it copies its input to NCHW and GELU / fc2 then read a transposed output (stage 0: ~4x slower on CPU)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden).to(memory_format=torch.channels_last)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        # Rebind x at each step so that fc1's output is freed once dwconv has used it, as in timm: holding it
        # until act() returns cost a fresh large allocation per call (stage-0 MLP of b0 ~30% slower in eval).
        x = self.fc1(x)
        B, N, C = x.shape
        x = self.relu(x.transpose(1, 2).reshape(B, C, feat_size[0], feat_size[1]))
        x = self.dwconv(x).flatten(2).transpose(1, 2)
        x = self.act(x)
        return self.drop(self.fc2(self.drop(x)))


class Block(nn.Module):
    """Pre-norm transformer block; ``attn`` is any registered attention."""

    def __init__(self, dim: int, attn: AttentionBase, mlp_ratio: float, linear: bool, drop: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = TimmLayerNorm(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = TimmLayerNorm(dim)
        self.mlp = MlpWithDepthwiseConv(dim, int(dim * mlp_ratio), drop=drop, extra_relu=linear)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        return x + self.drop_path2(self.mlp(self.norm2(x), feat_size))


class OverlapPatchEmbed(nn.Module):
    """Conv (kernel > stride, 'same' padding) then LayerNorm. (B, C_in, H, W) -> (B, H', W', C)."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Stage(nn.Module):
    """[downsample] -> blocks -> LayerNorm. Input NCHW (or NHWC for stage 0), output NCHW."""

    def __init__(self, dim_in: int, dim: int, blocks: List[Block], downsample: bool) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = OverlapPatchEmbed(3, 2, dim_in, dim) if downsample else None
        self.blocks = nn.ModuleList(blocks)
        self.norm = TimmLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        B, H, W, C = x.shape
        feat_size = (H, W)
        x = x.reshape(B, H * W, C)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, feat_size, use_reentrant=False)
            else:
                x = blk(x, feat_size)
        x = self.norm(x)  # rebind: the pre-norm tokens are freed before the contiguous copy
        return x.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()


class PVTv2(nn.Module):
    """PVTv2 backbone and classifier.

    Args:
        attn: registered attention name for the stages in ``attn_stages`` (see ``attention.list_attentions()``).
        attn_kwargs: that attention's own options, e.g. ``{"bits": 16}``.
        attn_stages: stage indices (0-3) that use ``attn``; ``None`` takes the attention's default
            (EcoFormer: 0-2; others: all). The other stages use softmax SRA.
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 2, 2), embed_dims: Sequence[int] = (32, 64, 160, 256),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), linear: bool = False, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", qkv_bias: bool = True, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 attn: str = "softmax", attn_kwargs: Optional[Mapping[str, Any]] = None,
                 attn_stages: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        attn_cls = get_attention_class(attn)
        attn_kwargs = dict(attn_kwargs or {})
        attn_cls.check_kwargs(attn_kwargs)
        attn_stages = tuple(attn_cls.default_stages if attn_stages is None else attn_stages)
        bad = [s for s in attn_stages if s not in range(len(depths))]
        if bad:
            raise ValueError(f"attn_stages {list(attn_stages)} name stage(s) {bad}; valid stages: "
                             f"0..{len(depths) - 1}")
        self.attn_name, self.attn_kwargs, self.attn_stages = attn, attn_kwargs, attn_stages
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.depths = tuple(depths)

        self.patch_embed = OverlapPatchEmbed(7, 4, in_chans, embed_dims[0])
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # linear in depth
        stages, self.feature_info, dim_in = [], [], embed_dims[0]
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            name, kwargs = (attn, attn_kwargs) if i in attn_stages else ("softmax", {})
            blocks = [Block(dim, create_attention(name, dim, num_heads[i], sr_ratios[i], linear, qkv_bias,
                                                  attn_drop_rate, proj_drop_rate, **kwargs),
                            mlp_ratios[i], linear, proj_drop_rate, rates.pop(0)) for _ in range(depth)]
            stages.append(Stage(dim_in, dim, blocks, downsample=i > 0))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
            dim_in = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def attention_modules(self) -> List[Tuple[str, AttentionBase]]:
        """(qualified name, module) of every block's attention, in forward order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, AttentionBase)]

    # timm model contract ---------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        ref = self.patch_embed.proj.weight
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"input of shape {tuple(x.shape)}: PVTv2 needs (B, C, H, W) images with H, W >= "
                             f"{MIN_INPUT_SIZE} (it downsamples by 32); resize or pad the input "
                             f"(e.g. data.img_size={MIN_INPUT_SIZE})")

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs (NCHW) at ``indices`` (last n stages if int, all if None), and the final map."""
        from timm.models._features import feature_take_indices

        if output_fmt != "NCHW":
            raise ValueError("only output_fmt='NCHW' is supported")
        self.check_input(x)
        take, max_index = feature_take_indices(len(self.stages), indices)
        x = self.patch_embed(x)
        intermediates = []
        for i, stage in enumerate(self.stages[:max_index + 1] if stop_early else self.stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C_last, H/32, W/32)."""
        self.check_input(x)
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x.mean(dim=(-1, -2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# checkpoints -------------------------------------------------------------------------------------------------
def adapt_state_dict(state: Mapping[str, torch.Tensor], model: PVTv2,
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """Map a PVTv2 state dict (this project's, timm's, the original PVT repository's or the EcoFormer authors';
    :func:`models.weights.to_timm_names`) onto ``model``.

    Blocks whose attention keys already match the model are copied (buffers the file lacks, such as the authors'
    bandwidth σ, keep the model's own values and are reported as new); otherwise each attention module converts
    its softmax weights (``AttentionBase.adapt_softmax_state``: e.g. EcoFormer's qk <- q, v <- value half of kv).
    Returns the complete state dict for ``model`` and a report ``{"converted", "copied", "dropped", "new"}`` of
    keys. Mismatching non-attention shapes (another architecture) raise a ``ValueError`` naming them.
    """
    authors = weight_layout(state) == "ecoformer_authors"
    state = to_timm_names(state)
    report: Dict[str, List[str]] = defaultdict(list)
    own = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    attn_prefixes = [name + "." for name, _ in model.attention_modules()]
    mismatched, paper_formula = [], []
    for name, module in model.attention_modules():
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        target = module.state_dict()
        kept = set(target) - set(sub)  # only the authors' files may lack buffers (their σ)
        keepable = {n for n, _ in module.named_buffers()} if authors else set()
        if (sub and set(sub) <= set(target) and kept <= keepable
                and all(sub[k].shape == target[k].shape for k in sub)):
            out.update({prefix + k: sub.get(k, target[k]) for k in target})
            report["copied"].extend(prefix + k for k in sub)
            report["new"].extend(prefix + k for k in sorted(kept))
            if authors and getattr(module, "formula", None) == "paper":
                paper_formula.append(name)
        elif module.attn_name == "softmax" and "q.weight" in sub and ("sr.weight" in sub) != ("sr.weight" in target):
            has_sr = "sr.weight" in sub
            mismatched.append(f"{prefix[:-1]}: the checkpoint's softmax block {'has' if has_sr else 'has no'} spatial "
                              f"reduction ({'SRA' if has_sr else 'full MSA'}); build the model with "
                              f"attn.sr={'true' if has_sr else 'false'}")
        elif "q.weight" in sub and "kv.weight" in sub:  # a softmax (SRA or MSA) block: convert
            out.update({prefix + k: v for k, v in module.adapt_softmax_state(sub, report, prefix).items()})
        else:
            mismatched.append(f"{prefix[:-1]}: the checkpoint has {sorted(set(sub) - set(target))[:8]} where this "
                              f"model's {module.attn_name} attention has {sorted(set(target) - set(sub))[:8]} "
                              "(neither the same attention nor softmax)")
    for key, value in own.items():
        if any(key.startswith(p) for p in attn_prefixes):
            continue
        if key not in state:
            out[key] = value
            report["new"].append(key)
        elif state[key].shape != value.shape:
            if key.startswith("head."):  # a classifier for another number of classes: keep the model's own
                out[key] = value
                report["new"].append(key)
            else:
                mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}")
        else:
            out[key] = state[key]
            report["copied"].append(key)
    if paper_formula:
        _logger.warning("%d EcoFormer blocks get the EcoFormer authors' weights under formula=paper; they were trained "
                        "with their formula: build the model with attn_kwargs={'formula': 'authors'} "
                        "(attn.formula=authors)", len(paper_formula))
    extra = [k for k in state if k not in own and not any(k.startswith(p) for p in attn_prefixes)]
    if mismatched or len(report["new"]) > 0.5 * len(own):
        raise ValueError("checkpoint does not fit this model (another architecture or attention?): "
                         + "; ".join(mismatched[:8] or [f"{len(report['new'])} missing keys, e.g. "
                                                        f"{report['new'][:5]}; unexpected keys, e.g. {extra[:5]}"]))
    report["dropped"].extend(extra)
    return out, dict(report)


def _pretrained_filter(state: Dict[str, torch.Tensor], model: PVTv2) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: original-PVT names -> timm names -> this model's attention."""
    return adapt_state_dict(state, model)[0]


# registry ------------------------------------------------------------------------------------------------------
def _cfg(variant: str) -> Dict[str, Any]:
    return dict(hf_hub_id=f"timm/pvt_v2_{variant}.in1k", num_classes=1000, input_size=(3, 224, 224),
                pool_size=(7, 7), crop_pct=0.9, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head",
                fixed_input_size=False, license="apache-2.0")


VARIANTS: Dict[str, Dict[str, Any]] = {
    "b0": dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256)),
    "b1": dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512)),
    "b2": dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512)),
    "b2_li": dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), linear=True),
    "b3": dict(depths=(3, 4, 18, 3), embed_dims=(64, 128, 320, 512)),
    "b4": dict(depths=(3, 8, 27, 3), embed_dims=(64, 128, 320, 512)),
    "b5": dict(depths=(3, 6, 40, 3), embed_dims=(64, 128, 320, 512), mlp_ratios=(4, 4, 4, 4)),
}
for _v in VARIANTS.values():
    _v.setdefault("num_heads", (1, 2, 5, 8))

default_cfgs = generate_default_cfgs({f"pvtv2_{v}.in1k": _cfg(v) for v in VARIANTS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> PVTv2:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(PVTv2, f"pvtv2_{variant}", pretrained, pretrained_filter_fn=_pretrained_filter,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
                                **dict(VARIANTS[variant], **kwargs))


@register_model
def pvtv2_b0(pretrained: bool = False, **kwargs: Any) -> PVTv2:
    return _create("b0", pretrained, **kwargs)


@register_model
def pvtv2_b1(pretrained: bool = False, **kwargs: Any) -> PVTv2:
    return _create("b1", pretrained, **kwargs)


@register_model
def pvtv2_b2(pretrained: bool = False, **kwargs: Any) -> PVTv2:
    return _create("b2", pretrained, **kwargs)


@register_model
def pvtv2_b2_li(pretrained: bool = False, **kwargs: Any) -> PVTv2:
    return _create("b2_li", pretrained, **kwargs)


@register_model
def pvtv2_b3(pretrained: bool = False, **kwargs: Any) -> PVTv2:
    return _create("b3", pretrained, **kwargs)


@register_model
def pvtv2_b4(pretrained: bool = False, **kwargs: Any) -> PVTv2:
    return _create("b4", pretrained, **kwargs)


@register_model
def pvtv2_b5(pretrained: bool = False, **kwargs: Any) -> PVTv2:
    return _create("b5", pretrained, **kwargs)
