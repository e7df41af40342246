"""ResNet for CIFAR-10 (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2).

The CIFAR variant, not the ImageNet one: a 3x3 stem, three stages of ``n`` basic blocks at widths
``w, 2w, 4w`` on 32x32, 16x16 and 8x8 maps, global average pooling and one linear layer, for
``depth = 6n + 2`` weighted layers. With ``w = 16``, depth 20 has about 0.27M parameters.

Shortcuts are the paper's option A: where a block halves the resolution and doubles the width, the
identity is subsampled with stride 2 and the new channels are zeros. Option A is what the paper
used on CIFAR; it adds no parameters, so every parameter an optimizer sees is a convolution,
BatchNorm or the classifier.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _ZeroPadShortcut(nn.Module):
    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra_channels // 2
        # Split the zero channels on both sides, as the reference Torch code did.
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = _ZeroPadShortcut(out_ch - in_ch, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet-(6n+2) of He et al. 2016 for 32x32 inputs.

    Args:
      depth: 6n+2 (8, 14, 20, 32, 44, 56, 110).
      width: channels of the first stage; the later stages have 2x and 4x.
      num_classes: outputs.
    """

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        in_ch = width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 ("Delving deep into rectifiers") initialisation, as the paper used.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
