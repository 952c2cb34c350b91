"""ShuffleNetV2 with torchvision's state-dict names (torchvision.models.shufflenet_v2_x0_5 ... x2_0),
so its ImageNet files (shufflenetv2_x1-5666bf0f80.pth, ...) load as they are.

conv1 (3x3 stride 2) and a max pool form the stem; stage2, stage3 and stage4 give C3, C4, C5
(strides 8, 16, 32; x1.0: 116, 232, 464 channels). torchvision's head (conv5.*, fc.*) is not built.
frozen_stages counts: stem = conv1, stages 1-3 = stage2-stage4. Initialisation is PyTorch's default,
as in torchvision (its ShuffleNetV2 sets none of its own)."""

from __future__ import annotations

import torch
from torch import nn

from detector.backbones.freezing import StagedBackbone

HEAD_PREFIXES = ("conv5.", "fc.")  # torchvision's classifier: dropped when loading its file
# name -> (blocks of stage2-4, channels of conv1 and stage2-4): torchvision's stages_repeats / stages_out_channels
WIDTHS = {
    "shufflenet_v2_x0_5": ((4, 8, 4), (24, 48, 96, 192)),
    "shufflenet_v2_x1_0": ((4, 8, 4), (24, 116, 232, 464)),
    "shufflenet_v2_x1_5": ((4, 8, 4), (24, 176, 352, 704)),
    "shufflenet_v2_x2_0": ((4, 8, 4), (24, 244, 488, 976)),
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def depthwise_conv(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, bias=False, groups=channels)


class InvertedResidual(nn.Module):
    """A stride-2 block runs both branches on the whole input; a stride-1 block keeps one half of
    the channels and runs branch2 on the other. Either way the halves are then shuffled."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        half = out_channels // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                depthwise_conv(in_channels, stride), nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, half, 1, 1, 0, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(in_channels if stride > 1 else half, half, 1, 1, 0, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            depthwise_conv(half, stride), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, 1, 0, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(StagedBackbone):
    def __init__(self, name: str = "shufflenet_v2_x1_0", frozen_stages: int = 1, norm_eval: bool = True):
        super().__init__(frozen_stages, norm_eval)
        repeats, channels = WIDTHS[name]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = channels[0]
        for i, (n, out) in enumerate(zip(repeats, channels[1:])):
            blocks = [InvertedResidual(in_channels, out, 2)] + [InvertedResidual(out, out, 1) for _ in range(n - 1)]
            self.add_module(f"stage{i + 2}", nn.Sequential(*blocks))
            in_channels = out
        self.out_channels = list(channels[1:])
        self.freeze_stages()

    def stage_groups(self) -> list[nn.Module]:
        """[stem (conv1), stage2, stage3, stage4]."""
        return [self.conv1, self.stage2, self.stage3, self.stage4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage2(self.maxpool(self.conv1(x)))
        c4 = self.stage3(c3)
        return [c3, c4, self.stage4(c4)]  # C3, C4, C5: strides 8, 16, 32
