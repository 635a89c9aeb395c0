"""Segmentation networks: a teacher and a compact student of one design, and the multi-path network.

Every model maps images (B, 3, H, W) to ``(logits (B, classes, H, W), features (B, C, H/2, W/2))``: the
features are the last map before the classifier, the one the feature-level losses (pair-wise affinity,
knowledge adaptation) compare between student and teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class EncoderDecoder(nn.Module):
    """A small DeepLab-like network: encoder to 1/4 with dilated context, decoder with a 1/2 skip.

    ``width`` sets the capacity: the teacher uses 32, the compact student 8 (about 14x fewer weights).
    """

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.stem = conv_bn_relu(3, width)
        self.down1 = nn.Sequential(conv_bn_relu(width, 2 * width, stride=2), conv_bn_relu(2 * width, 2 * width))
        self.down2 = nn.Sequential(
            conv_bn_relu(2 * width, 4 * width, stride=2),
            conv_bn_relu(4 * width, 4 * width, dilation=2),
            conv_bn_relu(4 * width, 4 * width, dilation=4),
        )
        self.fuse = conv_bn_relu(6 * width, 2 * width)
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)
        self.feature_channels = 2 * width

    def forward(self, images: torch.Tensor):
        half = self.down1(self.stem(images))
        quarter = self.down2(half)
        features = self.fuse(torch.cat([half, _upsample(quarter, half.shape[2:])], dim=1))
        return _upsample(self.classifier(features), images.shape[2:]), features


class SharedResidualBlock(nn.Module):
    """Zhuang et al., sec. 3.3: one 3x3 convolution applied twice (shared weights), a BatchNorm of its own
    after each application, dropout between the two, and the identity shortcut."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.relu(self.bn1(self.conv(x))))
        return F.relu(x + self.bn2(self.conv(y)))


class MultiPathNet(nn.Module):
    """The multi-path network of Zhuang et al. (sec. 3.1-3.2), in miniature.

    Column 0 (the backbone) goes down ``levels`` resolutions (1/2, 1/4, 1/8, ...); then ``pairs``
    encoder-decoder pairs follow, each an up-going column and, except after the last pair, a down-going
    one. Every block of a column sums the previous column's block at the same level (the skip connection
    at every level) with its own column's neighbour, resampled: bilinear upsampling after a 1x1
    convolution going up, a stride-2 3x3 convolution going down. All blocks are shared-weights residual
    blocks with dropout. The last up-going column ends at 1/2: its output is the feature map.
    """

    def __init__(self, num_classes: int, width: int = 8, levels: int = 3, pairs: int = 2, dropout: float = 0.1):
        super().__init__()
        self.levels = levels
        channels = [width * 2**level for level in range(levels)]
        self.stem = conv_bn_relu(3, channels[0], stride=2)
        self.backbone_down = nn.ModuleList(conv_bn_relu(channels[i - 1], channels[i], stride=2)
                                           for i in range(1, levels))
        column_kinds = ["down"] + ["up", "down"] * pairs
        self.column_kinds = column_kinds[:-1]  # the network ends on an up-going column
        self.blocks = nn.ModuleList(
            nn.ModuleList(SharedResidualBlock(c, dropout) for c in channels) for _ in self.column_kinds
        )
        self.up_links = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(channels[i + 1], channels[i], 1) for i in range(levels - 1))
            for kind in self.column_kinds if kind == "up"
        )
        self.down_links = nn.ModuleList(
            nn.ModuleList(conv_bn_relu(channels[i - 1], channels[i], stride=2) for i in range(1, levels))
            for kind in self.column_kinds[1:] if kind == "down"
        )
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)
        self.feature_channels = channels[0]

    def forward(self, images: torch.Tensor):
        column = [self.blocks[0][0](self.stem(images))]
        for level in range(1, self.levels):
            column.append(self.blocks[0][level](self.backbone_down[level - 1](column[-1])))
        ups, downs = iter(self.up_links), iter(self.down_links)
        for blocks, kind in zip(self.blocks[1:], self.column_kinds[1:]):
            previous, column = column, [None] * self.levels
            if kind == "up":
                links = next(ups)
                column[-1] = blocks[-1](previous[-1])
                for level in reversed(range(self.levels - 1)):
                    coarser = _upsample(links[level](column[level + 1]), previous[level].shape[2:])
                    column[level] = blocks[level](previous[level] + coarser)
            else:
                links = next(downs)
                column[0] = blocks[0](previous[0])
                for level in range(1, self.levels):
                    column[level] = blocks[level](previous[level] + links[level - 1](column[level - 1]))
        features = column[0]
        return _upsample(self.classifier(features), images.shape[2:]), features


def build_model(kind: str, num_classes: int, width: int) -> nn.Module:
    if kind == "multipath":
        return MultiPathNet(num_classes, width)
    return EncoderDecoder(num_classes, width)
