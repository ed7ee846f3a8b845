"""DigitNet: a small VGG-style CNN for 32×32 RGB inputs, shaped like the paper's networks
(conv features, then fc6 → ReLU → Dropout → fc7 → ReLU → Dropout → head) so every growth the paper
does on AlexNet/VGG (widen fc7, widen fc6+fc7, deepen after fc7, widen a conv) applies to it.
``models/digitnet.pt`` holds it pretrained on ``builtin:digits-source``."""

from __future__ import annotations

from torch import nn


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitNet(nn.Module):
    def __init__(self, num_classes: int = 5, width: int = 32, hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(3, width), nn.MaxPool2d(2),             # 16×16
            *_conv(width, 2 * width), nn.MaxPool2d(2),     # 8×8
            *_conv(2 * width, 2 * width), nn.MaxPool2d(2),  # 4×4
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * 16, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),   # fc6
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),           # fc7
            nn.Linear(hidden, num_classes),                                                  # head
        )

    def forward(self, x):
        x = self.features(x)
        x = x.flatten(1)
        return self.classifier(x)
