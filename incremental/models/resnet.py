"""ResNet-32 for 32x32 images, as iCaRL, PODNet and PyCIL use it on CIFAR-100, and timm's ResNet-18."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .options import ResNet18Config, ResNet32Config


class _ShortcutA(nn.Module):
    """He et al.'s option A: subsample and zero-pad channels (no parameters), as PyCIL."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = _ShortcutA(out_ch - in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3 stages of (depth-2)/6 basic blocks at widths w, 2w, 4w; timm's method names."""

    def __init__(self, depth: int = 32, width: int = 16, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, ch = [], width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks):
                layers.append(_BasicBlock(ch, out_ch, 2 if (i == 0 and stage > 0) else 1))
                ch = out_ch
        self.stages = nn.Sequential(*layers)
        self.num_features = ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # no classifier of its own: the incremental head follows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_resnet32(cfg: ResNet32Config, *, in_chans: int, img_size: int) -> nn.Module:
    """CIFAR ResNet-32 (0.46M parameters), the iCaRL/PODNet/PyCIL CIFAR baseline."""
    return CifarResNet(depth=32, width=cfg.width, in_chans=in_chans)


def build_resnet18(cfg: ResNet18Config, *, in_chans: int, img_size: int) -> nn.Module:
    """timm ResNet-18 (11.2M parameters), with a CIFAR stem for small images."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=in_chans,
                              drop_rate=cfg.drop_rate)
    small = cfg.stem == "cifar" or (cfg.stem == "auto" and img_size <= 64)
    if small:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
