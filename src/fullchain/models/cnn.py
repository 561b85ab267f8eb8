"""`ResNetCNN`: a ResNet-style image classifier, from a small 3-stage net for 28x28 images to ResNet-50/152.

One class covers the range through its arguments (block type, widths, blocks per stage, stem), so the
small models the tests train and the ResNet-50/152 used for the AMP benchmarks (MISSION C8) share
one code path; `RESNET_PRESETS` holds the arguments of the classic ImageNet depths.

Every convolution, BatchNorm and ReLU is its own module, in conv -> bn -> relu order and never
reused across places: the Conv/BN/ReLU folding and quantisation passes (MISSION C10) match on those
modules. Convolutions followed by BatchNorm have no bias (BN's shift makes it redundant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

BLOCKS = ("basic", "bottleneck")
STEMS = ("small", "imagenet")

# Arguments that reproduce torchvision's resnetNN (v1.5: stride on the 3x3 conv) parameter for parameter:
# ``ResNetCNN(num_classes=1000, **RESNET_PRESETS["resnet50"])`` has 25.56 M parameters.
RESNET_PRESETS: dict[str, dict] = {
    "resnet18": {"block": "basic", "widths": (64, 128, 256, 512), "blocks_per_stage": (2, 2, 2, 2),
                 "stem": "imagenet", "channels": 3},
    "resnet34": {"block": "basic", "widths": (64, 128, 256, 512), "blocks_per_stage": (3, 4, 6, 3),
                 "stem": "imagenet", "channels": 3},
    "resnet50": {"block": "bottleneck", "widths": (256, 512, 1024, 2048), "blocks_per_stage": (3, 4, 6, 3),
                 "stem": "imagenet", "channels": 3},
    "resnet101": {"block": "bottleneck", "widths": (256, 512, 1024, 2048), "blocks_per_stage": (3, 4, 23, 3),
                  "stem": "imagenet", "channels": 3},
    "resnet152": {"block": "bottleneck", "widths": (256, 512, 1024, 2048), "blocks_per_stage": (3, 8, 36, 3),
                  "stem": "imagenet", "channels": 3},
}


def _shortcut(in_width: int, out_width: int, stride: int) -> nn.Module:
    """Identity when the shape is unchanged, else a 1x1 conv + BN projection."""
    if stride == 1 and in_width == out_width:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_width, out_width, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_width),
    )


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus shortcut, then ReLU (ResNet-18/34 block)."""

    expansion = 1

    def __init__(self, in_width: int, out_width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, out_width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_width, out_width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_width)
        self.shortcut = _shortcut(in_width, out_width, stride)
        self.relu2 = nn.ReLU()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1-bn-relu-conv3x3(stride)-bn-relu-conv1x1-bn, plus shortcut, then ReLU (ResNet-50+ block).

    ``out_width`` is the block's output width; the inner width is ``out_width // 4``.
    """

    expansion = 4

    def __init__(self, in_width: int, out_width: int, stride: int = 1):
        super().__init__()
        mid = out_width // self.expansion
        self.conv1 = nn.Conv2d(in_width, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_width)
        self.shortcut = _shortcut(in_width, out_width, stride)
        self.relu3 = nn.ReLU()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """Images ``[B, channels, H, W]`` -> logits ``[B, num_classes]``.

    Layout: stem -> stages -> global average pool -> (dropout) -> Linear.

    - ``stem="small"``: conv3x3 (stride 1) -> BN -> ReLU, for small images (28x28, 32x32).
      ``stem="imagenet"``: conv7x7 (stride 2) -> BN -> ReLU -> maxpool3x3 (stride 2), for 224x224.
    - ``stem_width``: the stem's output width; default ``widths[0] // expansion`` (the first stage's
      inner width: 32 for the default net, 64 for ResNet-50).
    - stage i has ``blocks_per_stage[i]`` blocks of output width ``widths[i]``; every stage after the
      first halves the resolution in its first block.
    - ``block``: "basic" (two 3x3 convs) or "bottleneck" (1x1-3x3-1x1, expansion 4).
    - ``zero_init_residual``: start each block's last BN at gamma=0 so every block begins as the
      identity (Goyal et al., 2017); off by default, as in torchvision.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: Sequence[int] = (1, 1, 1),
        block: str = "basic",
        stem: str = "small",
        stem_width: int | None = None,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        blocks_per_stage = tuple(int(n) for n in blocks_per_stage)
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {block!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if not widths or len(widths) != len(blocks_per_stage):
            raise ValueError(
                f"widths {list(widths)} and blocks_per_stage {list(blocks_per_stage)} must be non-empty "
                "and of the same length (one entry per stage)"
            )
        if any(n < 1 for n in blocks_per_stage) or num_classes < 1 or channels < 1:
            raise ValueError("num_classes, channels and every entry of blocks_per_stage must be at least 1")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        if any(w < block_cls.expansion or w % block_cls.expansion for w in widths):
            raise ValueError(f"with block={block!r} every width must be a multiple of {block_cls.expansion}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        stem_width = int(stem_width) if stem_width is not None else widths[0] // block_cls.expansion

        if stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(channels, stem_width, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )

        stages = []
        in_width = stem_width
        for i, (width, n_blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(in_width, width, stride))
                in_width = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(start_dim=1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_width, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.dropout(self.flatten(self.pool(x))))
