"""A custom backbone in one file, following timm's contract (forward_features,
forward_head(pre_logits=True), num_features) so every strategy and probe can use it.

    incremental run digits_b0_5steps --plugin experiments/custom_plugin/small_cnn.py \
        --set backbone=small_cnn --set training.optimizer.lr=0.01
"""

from dataclasses import dataclass

from torch import nn

from incremental.config import opt
from incremental.registry import BACKBONES


@dataclass
class SmallCnnConfig:
    width: int = opt(32, ge=4)  # channels of the first block; doubled in the second and third


class SmallCnn(nn.Module):
    def __init__(self, in_chans: int, width: int):
        super().__init__()
        layers, channels = [], in_chans
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.num_features = channels

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))  # the toolkit's growing classifier comes after the pooled features

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@BACKBONES.register("small_cnn", config=SmallCnnConfig)
def build_small_cnn(cfg: SmallCnnConfig, *, in_chans: int, img_size: int) -> nn.Module:
    """Three conv-BN-ReLU-pool blocks (a custom backbone example)."""
    return SmallCnn(in_chans, cfg.width)
