"""The digits example's network: a small MLP over the 8x8 pixels of a handwritten digit."""

import torch
from torch import nn

NUM_PIXELS = 64
NUM_CLASSES = 10


class DigitsNet(nn.Module):
    """MLP 64 -> hidden -> 10 returning class logits."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.hidden = nn.Linear(NUM_PIXELS, hidden)
        self.out = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of flattened images scaled to [0, 1]."""
        return self.out(torch.relu(self.hidden(x)))
