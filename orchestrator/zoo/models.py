"""Built-in torch models: ``mnist1d_cnn`` (MNIST-1D), ``digits_cnn`` (8x8x1 digits) and ``resnet_cifar``
(ResNet-20 style, 32x32x3). The ``transformers`` ones are in ``hf_models.py``."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits: conv-BN-ReLU, a residual block (``x + y``), pooling, linear.

    Input ``[N, 1, 8, 8]``, output logits ``[N, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv4 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.relu4 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(x)))
        y = self.bn3(self.conv3(y))
        x = self.relu3(x + y)
        x = self.pool(x)
        x = self.relu4(self.bn4(self.conv4(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU, conv-BN, residual add (1x1 conv shortcut when shapes change), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-20 style network for 32x32x3 inputs (3 stages of ``blocks`` basic blocks, 16/32/64 channels).

    Input ``[N, 3, 32, 32]``, output logits ``[N, num_classes]``; ``blocks=3`` is ResNet-20.
    """

    def __init__(self, num_classes: int = 10, blocks: int = 3, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers = []
        in_ch = width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            stage_blocks = []
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                stage_blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Mnist1dCNN(nn.Module):
    """Three strided Conv1d-ReLU layers and a linear classifier for MNIST-1D (Greydanus 2020's
    ``ConvBase``, ``width`` channels). Input ``[N, 1, 40]``, output logits ``[N, num_classes]``;
    the sequence shrinks 40 -> 20 -> 10 -> 5."""

    def __init__(self, num_classes: int = 10, width: int = 64, length: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, width, 5, stride=2, padding=2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.relu3 = nn.ReLU()
        out_length = length
        for _ in range(3):
            out_length = (out_length + 1) // 2
        self.fc = nn.Linear(width * out_length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(torch.flatten(x, 1))
