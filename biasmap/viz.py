"""Plots of attribution maps: DAAM-style heatmap overlays with masks and IoU (paper Figure 3) and
per-block BIoU bar charts (Figures 4-6). matplotlib is imported on use, with the Agg backend
when no display backend was chosen, so plotting works on headless machines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        try:
            matplotlib.use("Agg")
        except Exception:  # a GUI backend already in use stays
            pass
    import matplotlib.pyplot as plt

    return plt


def image_array(image, index: int = 0) -> np.ndarray:
    """float [H, W, 3] in [0, 1] from a PIL image, an array [H, W, 3] (uint8 or float), a tensor
    [3, H, W] / [B, 3, H, W] in [0, 1], or a list of images (entry `index`)."""
    if isinstance(image, (list, tuple)):
        image = image[index]
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.dim() == 4:
            tensor = tensor[index]
        if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(
                f"image tensor must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}"
            )
        return tensor.expand(3, -1, -1).permute(1, 2, 0).clamp(0, 1).numpy()
    array = np.asarray(image)
    if array.ndim == 4:
        array = array[index]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3], got an array of shape {array.shape}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _upsampled(map_2d: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a map [S_h, S_w] to the image size, min-max scaled to [0, 1]."""
    up = torch.nn.functional.interpolate(
        map_2d[None, None].float().cpu(), size=(height, width), mode="bilinear", align_corners=False
    )[0, 0]
    span = up.max() - up.min()
    return ((up - up.min()) / span if span > 0 else torch.zeros_like(up)).numpy()


def _mask_image(mask: torch.Tensor, height: int, width: int) -> np.ndarray:
    up = torch.nn.functional.interpolate(
        mask[None, None].float().cpu(), size=(height, width), mode="nearest"
    )
    return up[0, 0].numpy() > 0.5


def plot_attribution(maps, image, a, b, q: float = 0.7, *, index: int = 0, path=None):
    """Paper Figure 3 for one image: image | heatmap a, b | mask a, b | overlap and IoU.

    maps: AttributionMaps; a, b: concepts (word or index); q: mask quantile. Returns the
    Figure and writes it to `path` when given.
    """
    plt = _pyplot()
    picture = image_array(image, index)
    height, width = picture.shape[:2]
    name_a, name_b = maps.concepts[maps.index(a)], maps.concepts[maps.index(b)]
    mask_a = maps.masks(a, q)[index]
    mask_b = maps.masks(b, q)[index]
    iou = float(maps.iou(a, b, q)[index])
    full_a, full_b = _mask_image(mask_a, height, width), _mask_image(mask_b, height, width)
    overlap = np.ones((height, width, 3), dtype=np.float32)
    overlap[full_a & ~full_b] = (0.85, 0.25, 0.25)  # only a: red
    overlap[full_b & ~full_a] = (0.25, 0.4, 0.85)  # only b: blue
    overlap[full_a & full_b] = (0.55, 0.2, 0.65)  # both: purple

    figure, axes = plt.subplots(1, 6, figsize=(18, 3.4))
    axes[0].imshow(picture)
    axes[0].set_title("image")
    for axis, concept, name in ((axes[1], a, name_a), (axes[2], b, name_b)):
        axis.imshow(picture)
        axis.imshow(_upsampled(maps.concept(concept)[index], height, width), cmap="jet", alpha=0.5)
        axis.set_title(f"map: {name}")
    axes[3].imshow(full_a, cmap="gray")
    axes[3].set_title(f"mask: {name_a} (q={q})")
    axes[4].imshow(full_b, cmap="gray")
    axes[4].set_title(f"mask: {name_b} (q={q})")
    axes[5].imshow(overlap)
    axes[5].set_title(f"overlap, IoU = {iou:.3f}")
    axes[5].text(
        0.5,
        -0.06,
        f"red: {name_a} only, blue: {name_b} only, purple: both",
        transform=axes[5].transAxes,
        ha="center",
        va="top",
        fontsize=8,
    )
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    if path is not None:
        figure.savefig(Path(path), dpi=100)
    return figure


def plot_biou(maps, a, b, q: float = 0.7, *, index: int | None = None, path=None):
    """Per-block BIoU bars (paper Figures 4-6) with the mean as a dashed line.

    index: one image, or None for the mean over the batch (the paper's mBIoU).
    """
    plt = _pyplot()
    biou = maps.biou(a, b, q)
    mean = biou.pop("mean")
    names = list(biou)
    pick = (lambda v: float(v.float().mean())) if index is None else (lambda v: float(v[index]))
    values = [pick(biou[name]) for name in names]
    name_a, name_b = maps.concepts[maps.index(a)], maps.concepts[maps.index(b)]
    figure, axis = plt.subplots(figsize=(1.1 * len(names) + 2.5, 3.4))
    bars = axis.bar(names, values, color="#5577aa")
    axis.bar_label(bars, fmt="%.2f", fontsize=8)
    axis.axhline(pick(mean), color="#aa3333", linestyle="--", label=f"mean {pick(mean):.3f}")
    axis.set_ylim(0, 1)
    axis.set_ylabel("BIoU")
    which = "mean over images" if index is None else f"image {index}"
    axis.set_title(f"BIoU({name_a}, {name_b}), q={q}, {which}")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    if path is not None:
        figure.savefig(Path(path), dpi=100)
    return figure
