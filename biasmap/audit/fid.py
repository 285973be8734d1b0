"""FID of each method's images against the base model's (`sd`) images of the same prompts and
seeds, as in the paper (Section 4: "calculated against the generated images by the base model
SD1.5"; Tables 1-3 and 7).

Pairing: an image of (profession, axis, seed, method, lambda_) is paired with the `sd` image of
the same (profession, axis, seed). FID is computed per (axis, method, lambda_, profession)
(Table 7) and pooled over professions per (axis, method, lambda_) (Tables 1-2), over the
paired images only; a group with fewer than 2 pairs has no FID.

The statistics are torchmetrics' `FrechetInceptionDistance`. Its feature network is passed in:

- the real one is `FidInceptionV3`, the Inception-v3 variant the FID reference implementation
  uses (TensorFlow's 2015-12-05 graph as ported to PyTorch), written here from its published
  structure so that neither torchvision nor torch-fidelity is needed; its weights come from a
  local file (config option `fid_weights`, see `load_fid_inception`);
- tests pass any small `nn.Module` mapping images [B, 3, H, W] in [0, 1] to features [B, D].

Every image's features are extracted once and then fed to the metric through a pass-through
module, because the `sd` reference images are shared by every method and lambda.
Without weights FID is reported as unavailable, with the reason; no number is made up.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.nn import functional as F

REFERENCE_METHOD = "sd"
FID_INPUT_SIZE = 299
FID_FEATURES = 2048
# The reference weights (pytorch-fid's and torch-fidelity's file; both name it so).
REFERENCE_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class FidUnavailableError(RuntimeError):
    """FID cannot be computed; the message is the reason shown in the report."""


# --------------------------------------------------------------------------- Inception-v3 (FID)


class _ConvBnRelu(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as the TF graph) -> ReLU; parameters named
    `conv.*` and `bn.*` as in the reference weight file."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _average_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # The TF graph's average pools exclude the zero padding from the mean (unlike torch's
    # default); this is one of the differences between FID's Inception and torchvision's.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, in_channels: int, pool_channels: int):
        super().__init__()
        self.branch1x1 = _ConvBnRelu(in_channels, 64, 1)
        self.branch5x5_1 = _ConvBnRelu(in_channels, 48, 1)
        self.branch5x5_2 = _ConvBnRelu(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBnRelu(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBnRelu(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBnRelu(96, 96, 3, padding=1)
        self.branch_pool = _ConvBnRelu(in_channels, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_average_pool_3x3(x)),
            ],
            dim=1,
        )


class _ReductionB(nn.Module):
    """35x35 -> 17x17: stride-2 3x3 | 1x1 -> 3x3 -> stride-2 3x3 | max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _ConvBnRelu(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBnRelu(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBnRelu(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBnRelu(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        row, column = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        self.branch1x1 = _ConvBnRelu(in_channels, 192, 1)
        self.branch7x7_1 = _ConvBnRelu(in_channels, c, 1)
        self.branch7x7_2 = _ConvBnRelu(c, c, row[0], padding=row[1])
        self.branch7x7_3 = _ConvBnRelu(c, 192, column[0], padding=column[1])
        self.branch7x7dbl_1 = _ConvBnRelu(in_channels, c, 1)
        self.branch7x7dbl_2 = _ConvBnRelu(c, c, column[0], padding=column[1])
        self.branch7x7dbl_3 = _ConvBnRelu(c, c, row[0], padding=row[1])
        self.branch7x7dbl_4 = _ConvBnRelu(c, c, column[0], padding=column[1])
        self.branch7x7dbl_5 = _ConvBnRelu(c, 192, row[0], padding=row[1])
        self.branch_pool = _ConvBnRelu(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                double,
                self.branch_pool(_average_pool_3x3(x)),
            ],
            dim=1,
        )


class _ReductionD(nn.Module):
    """17x17 -> 8x8: 1x1 -> stride-2 3x3 | 1x1 -> 1x7 -> 7x1 -> stride-2 3x3 | max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _ConvBnRelu(in_channels, 192, 1)
        self.branch3x3_2 = _ConvBnRelu(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBnRelu(in_channels, 192, 1)
        self.branch7x7x3_2 = _ConvBnRelu(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBnRelu(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBnRelu(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = x
        for layer in (
            self.branch7x7x3_1,
            self.branch7x7x3_2,
            self.branch7x7x3_3,
            self.branch7x7x3_4,
        ):
            tower = layer(tower)
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                tower,
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs. The TF graph's last block (Mixed_7c) pools
    its pool branch with a max pool, the one before (Mixed_7b) with an average pool."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBnRelu(in_channels, 320, 1)
        self.branch3x3_1 = _ConvBnRelu(in_channels, 384, 1)
        self.branch3x3_2a = _ConvBnRelu(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBnRelu(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBnRelu(in_channels, 448, 1)
        self.branch3x3dbl_2 = _ConvBnRelu(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBnRelu(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBnRelu(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBnRelu(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _average_pool_3x3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class FidInceptionV3(nn.Module):
    """The Inception-v3 feature network of FID: images -> 2048 pool features.

    forward: float images [B, 3, H, W] with values in [0, 1] -> float32 features [B, 2048].
    Images are resized to 299x299 (bilinear, align_corners=False) and scaled to [-1, 1],
    as pytorch-fid does; torch-fidelity's TF-exact resize can differ in the last digits.
    Module names follow the reference weight file, so `load_state_dict` takes it directly.
    """

    num_features = FID_FEATURES  # read by torchmetrics instead of a dummy forward

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBnRelu(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBnRelu(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBnRelu(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBnRelu(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBnRelu(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_channels=32)
        self.Mixed_5c = _MixedA(256, pool_channels=64)
        self.Mixed_5d = _MixedA(288, pool_channels=64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _MixedC(768, channels_7x7=128)
        self.Mixed_6c = _MixedC(768, channels_7x7=160)
        self.Mixed_6d = _MixedC(768, channels_7x7=160)
        self.Mixed_6e = _MixedC(768, channels_7x7=192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _MixedE(1280, pool="avg")
        self.Mixed_7c = _MixedE(2048, pool="max")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.Conv2d_1a_3x3.conv.weight.dtype)
        x = F.interpolate(
            x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False
        )
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))


# Keys of the reference file that the feature network does not use: the 1008-way classifier,
# the auxiliary head of the training graph, and BatchNorm's step counters.
_UNUSED_KEY_PREFIXES = ("fc.", "AuxLogits.")


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FidInceptionV3:
    """FidInceptionV3 with the weights of a local file, in eval mode.

    Accepted: a PyTorch state dict saved with torch.save (`.pth` / `.pt` / `.bin`), such as
    pytorch-fid's and torch-fidelity's `pt_inception-2015-12-05-6726825d.pth`, optionally
    nested under "state_dict"; or a `.safetensors` file with the same keys. Keys follow
    torchvision's Inception3 names (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.
    running_mean`, ...); `fc.*`, `AuxLogits.*` and `num_batches_tracked` are ignored.
    Raises FidUnavailableError naming the file and the missing or unexpected keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FidUnavailableError(
            f"FID Inception weights {str(path)!r} not found. Set fid_weights to a local copy "
            f"of {REFERENCE_WEIGHTS_FILE} (pytorch-fid's release file; a .pth/.pt state dict "
            "or .safetensors with torchvision Inception3 key names)."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same user-facing problem
        raise FidUnavailableError(
            f"could not read FID Inception weights {str(path)!r}: {error}. Accepted: a "
            "torch.save state dict (.pth/.pt/.bin) or a .safetensors file."
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FidUnavailableError(
            f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors"
        )
    state = {
        key: value
        for key, value in state.items()
        if not key.startswith(_UNUSED_KEY_PREFIXES) and not key.endswith("num_batches_tracked")
    }
    model = FidInceptionV3()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FidUnavailableError(
            f"{str(path)!r} is not an FID Inception-v3 state dict: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}. Expected "
            f"torchvision Inception3 names, as in {REFERENCE_WEIGHTS_FILE}."
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # wrong shapes
        raise FidUnavailableError(
            f"{str(path)!r} does not fit FID's Inception-v3: {error}"
        ) from error
    return model.eval().requires_grad_(False).to(device)


# --------------------------------------------------------------------------- scoring


class _PrecomputedFeatures(nn.Module):
    """Pass-through "feature network" for torchmetrics: the inputs already are features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FID statistics of two feature sets [N_real, D] and [N_fake, D] (N >= 2)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("FID needs at least 2 feature vectors on each side")
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def load_image(path: Path) -> torch.Tensor:
    """A PNG as float32 [3, H, W] in [0, 1] (RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def extract_features(
    paths: Sequence[Path],
    feature: nn.Module,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Features float64 [N, D] of the images at `paths`, `batch_size` images per forward.

    Images of one batch must share a size (those of an audit run do).
    """
    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([load_image(p) for p in paths[start : start + batch_size]])
        chunks.append(feature(batch.to(device)).double().cpu().reshape(len(batch), -1))
    return torch.cat(chunks) if chunks else torch.zeros(0, 0, dtype=torch.float64)


GroupKey = tuple[str, str, float, "str | None"]  # (axis, method, lambda_, profession or None)


@dataclass(frozen=True)
class FidScores:
    """FID per group, or why there is none.

    values: (axis, method, lambda_, profession) -> FID, profession None for the pooled group.
    pairs: the number of (method image, sd image) pairs behind each value.
    unavailable: the reason when no FID could be computed at all (None otherwise).
    notes: why individual groups or images were left out.
    """

    values: dict[GroupKey, float] = field(default_factory=dict)
    pairs: dict[GroupKey, int] = field(default_factory=dict)
    unavailable: str | None = None
    notes: list[str] = field(default_factory=list)
    extractor: str = ""


def fid_feature_network(
    weights: str | Path | None, device: str | torch.device = "cpu"
) -> nn.Module:
    """The FID Inception-v3 loaded from `weights`; FidUnavailableError (the reason) without."""
    if not weights:
        raise FidUnavailableError(
            "no FID Inception weights configured: set fid_weights (config or --fid-weights) to "
            f"a local copy of {REFERENCE_WEIGHTS_FILE}"
        )
    return load_fid_inception(weights, device)


def fid_scores(
    run_dir: str | Path,
    rows: pa.Table,
    *,
    feature: nn.Module | None = None,
    weights: str | Path | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> FidScores:
    """FID of every (axis, method, lambda_) against the sd images of the same prompts and seeds.

    run_dir: the audit folder (image_path values are relative to it); rows: the store's rows
    (metrics.read_store(run_dir).table). feature: a feature network (images [B, 3, H, W] in
    [0, 1] -> [B, D]); without one, FidInceptionV3 is loaded from `weights`. Never raises for
    missing weights, images or reference rows: those make `unavailable` / `notes` say why.
    """
    run_dir = Path(run_dir)
    records = rows.select(
        ["profession", "axis", "seed", "method", "lambda_", "image_path"]
    ).to_pylist()
    references = {
        (r["profession"], r["axis"], r["seed"]): r
        for r in records
        if r["method"] == REFERENCE_METHOD
    }
    others = [r for r in records if r["method"] != REFERENCE_METHOD]
    if not references:
        return FidScores(
            unavailable=f"the store has no {REFERENCE_METHOD!r} images to compare "
            "against (FID is measured against the base model's images)"
        )
    if not others:
        return FidScores(unavailable=f"the store has only {REFERENCE_METHOD!r} images")
    if feature is None:
        try:
            feature = fid_feature_network(weights, device)
        except FidUnavailableError as error:
            return FidScores(unavailable=str(error))
    feature = feature.eval().to(device)
    notes: list[str] = []

    def image_file(record) -> Path | None:
        path = run_dir / record["image_path"] if record["image_path"] else None
        return path if path is not None and path.is_file() else None

    pairs_by_group: dict[GroupKey, list[tuple[Path, Path]]] = defaultdict(list)
    unpaired = missing = 0
    for record in others:
        reference = references.get((record["profession"], record["axis"], record["seed"]))
        if reference is None:
            unpaired += 1
            continue
        fake, real = image_file(record), image_file(reference)
        if fake is None or real is None:
            missing += 1
            continue
        group = (record["axis"], record["method"], record["lambda_"])
        pairs_by_group[(*group, record["profession"])].append((real, fake))
        pairs_by_group[(*group, None)].append((real, fake))
    if unpaired:
        notes.append(
            f"{unpaired} images have no {REFERENCE_METHOD} image of the same "
            "profession, axis and seed and are left out of FID"
        )
    if missing:
        notes.append(f"{missing} image pairs are left out of FID: an image file is missing")

    paths = sorted({p for pairs in pairs_by_group.values() for pair in pairs for p in pair})
    if progress:
        progress(f"FID: extracting features of {len(paths)} images")
    features = dict(
        zip(
            paths,
            extract_features(paths, feature, batch_size=batch_size, device=device),
            strict=True,
        )
    )
    values, counts = {}, {}
    for group, pairs in pairs_by_group.items():
        if len(pairs) < 2:
            notes.append(f"FID of {group} needs at least 2 image pairs, the store has {len(pairs)}")
            continue
        real = torch.stack([features[r] for r, _ in pairs])
        fake = torch.stack([features[f] for _, f in pairs])
        values[group] = frechet_distance(real, fake)
        counts[group] = len(pairs)
    return FidScores(values=values, pairs=counts, notes=notes, extractor=type(feature).__name__)
