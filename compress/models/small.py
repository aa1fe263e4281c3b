"""Small networks for MNIST-sized inputs: MLPNet, LeNet-300-100, LeNet-5."""

from __future__ import annotations

import math

from torch import nn


def _flat_features(in_channels: int, input_size: tuple[int, int]) -> int:
    return in_channels * input_size[0] * input_size[1]


def mlpnet(num_classes: int = 10, in_channels: int = 1,
           input_size: tuple[int, int] = (28, 28)) -> nn.Module:
    """784-40-20-10 without biases: the MLP of the CBS and WoodFisher papers."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_features(in_channels, input_size), 40, bias=False), nn.ReLU(),
        nn.Linear(40, 20, bias=False), nn.ReLU(),
        nn.Linear(20, num_classes, bias=False),
    )


def lenet300(num_classes: int = 10, in_channels: int = 1,
             input_size: tuple[int, int] = (28, 28)) -> nn.Module:
    """LeNet-300-100: 784-300-100-10 with biases."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_features(in_channels, input_size), 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; conv1 is padded so 28x28 inputs give 5x5 maps."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 input_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        h = math.floor((math.floor(input_size[0] / 2) - 4) / 2)
        w = math.floor((math.floor(input_size[1] / 2) - 4) / 2)
        if h < 1 or w < 1:
            raise ValueError(f"LeNet-5 needs inputs of at least 12x12, got {input_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def lenet5(num_classes: int = 10, in_channels: int = 1,
           input_size: tuple[int, int] = (28, 28)) -> nn.Module:
    return LeNet5(num_classes, in_channels, input_size)
