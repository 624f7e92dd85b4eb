"""The one rule that decides the size an image is resized to (`data.image_size`, `data.resize`).

'square' (the paper) resizes every image to data.image_size x data.image_size (or to (H, W) when
image_size is a pair), squashing non-square images. 'short_side' scales the image so its short side
becomes data.image_size and 'long_side' so its long side does; the other side keeps the aspect ratio
and is rounded to a multiple of the networks' total stride (`network_stride`), so nothing is squashed
by more than half a stride and every resized image fits the U-Nets. The readers, the training
pipeline and `image_io`'s load path (`load_image`, `prepare_image`, `load_mask`) all resize with
`Resize.hw`; pass them `resize_of(config)`.
"""

from __future__ import annotations

import dataclasses

from diff_fastener_jax.config_schema import RESIZE_MODES


def size_hw(size) -> tuple[int, int]:
    """data.image_size (int or (H, W)) -> (H, W)."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def network_stride(model_cfg) -> int:
    """The networks' total downsampling: 2^(levels - 1) of the deeper of the reconstruction U-Net
    (`model.channel_mults`) and the segmentation net (`model.seg_channels`). Input sides must be
    multiples of it."""
    return max(2 ** (len(model_cfg.channel_mults) - 1), 2 ** (len(model_cfg.seg_channels) - 1))


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclasses.dataclass(frozen=True)
class Resize:
    """How images are resized: `size` (int, or (H, W) for 'square'), `mode` (RESIZE_MODES), `stride`
    (the side multiple of 'short_side' / 'long_side')."""

    size: int | tuple[int, int]
    mode: str = "square"
    stride: int = 1

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"data.resize must be one of {RESIZE_MODES}, got {self.mode!r}")
        if self.mode != "square" and isinstance(self.size, (tuple, list)):
            raise ValueError(f"data.resize={self.mode!r} needs an int data.image_size, got {self.size!r}")

    def hw(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) an image of `original_hw` is resized to."""
        if self.mode == "square":
            return size_hw(self.size)
        h0, w0 = int(original_hw[0]), int(original_hw[1])
        side = int(self.size)
        scale = side / (min(h0, w0) if self.mode == "short_side" else max(h0, w0))
        if h0 <= w0:  # landscape or square: height is the short side
            return (
                (side, _round_to(w0 * scale, self.stride))
                if self.mode == "short_side"
                else (_round_to(h0 * scale, self.stride), side)
            )
        return (
            (_round_to(h0 * scale, self.stride), side)
            if self.mode == "short_side"
            else (side, _round_to(w0 * scale, self.stride))
        )

    @property
    def fixed_hw(self) -> tuple[int, int] | None:
        """(H, W) every image gets, or None when it depends on the image ('short_side', 'long_side')."""
        return size_hw(self.size) if self.mode == "square" else None


def resize_of(config) -> Resize:
    """The resize rule of a config (config.data.image_size / resize, the networks' stride)."""
    d = config.data
    size = d.image_size
    size = tuple(int(v) for v in size) if isinstance(size, (tuple, list)) else int(size)
    return Resize(size, str(d.get("resize", "square")), network_stride(config.model))


def as_resize(size) -> Resize:
    """`size` as a Resize: a Resize as it is; an int or (H, W) as 'square' (the exact size)."""
    if isinstance(size, Resize):
        return size
    return Resize(tuple(size_hw(size)) if isinstance(size, (tuple, list)) else int(size))
