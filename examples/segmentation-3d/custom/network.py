"""The segmentation example's network: MONAI's 3D UNet with one output channel (foreground logits)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet


class SegmentationUNet(UNet):
    """A 3D UNet, 1 channel in, 1 logit out, halving the resolution between successive `channels`."""

    def __init__(self, channels: Sequence[int] = (8, 16, 32, 64), num_res_units: int = 1) -> None:
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels must list at least two positive widths, got {list(channels)}")
        super().__init__(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
        )
