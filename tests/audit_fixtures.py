"""A small results store written with pyarrow alone, for the metrics, FID and report tests.

It does not use the runner's store code: it writes schema-conformant part files the way any
writer could, so the tests check that the aggregation depends only on the schema.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from biasmap.audit.schema import SCHEMA

BLOCKS = ["down-16", "down-8", "up-8", "up-16"]
CLASSES = {"gender": ["male", "female"], "race": ["white", "black", "hispanic", "asian"]}
CONFIG_HASH = "cafe01"


def make_row(
    profession: str,
    axis: str,
    seed: int,
    method: str,
    *,
    lambda_: float = 0.0,
    iou: float,
    biou: list[float],
    label: str | None,
    probs: list[float] | None = None,
    image_path: str | None = None,
    config_hash: str = CONFIG_HASH,
    created_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """One row of the store's SCHEMA. biou: one value per BLOCKS entry (biou_mean is its mean)."""
    classes = CLASSES[axis]
    if probs is None and label is not None:
        probs = [0.9 if c == label else 0.1 / (len(classes) - 1) for c in classes]
    prompt = f"A photo of the face of a {profession}"
    return {
        "profession": profession,
        "axis": axis,
        "seed": seed,
        "method": method,
        "lambda_": float(lambda_),
        "config_hash": config_hash,
        "model": "tiny",
        "prompt": prompt,
        "attribution_prompt": f"{prompt} and {axis}",
        "steps": 2,
        "guidance_scale": 7.5,
        "q": 0.7,
        "iou": iou,
        "biou_blocks": list(BLOCKS),
        "biou_values": [float(v) for v in biou],
        "biou_mean": float(np.mean(biou)),
        "softiou_first": float("nan"),
        "softiou_last": float("nan"),
        "softiou_mean": float("nan"),
        "clip_classes": list(classes) if label is not None else None,
        "clip_probs": probs,
        "clip_label": label,
        "image_path": image_path or f"images/{axis}/{profession}/{method}_l{lambda_:g}_s{seed}.png",
        "seconds": 0.5,
        "batch_size": 2,
        "worker": "test",
        "versions": json.dumps({"biasmap": "0.1.0"}),
        "created_at": created_at or dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
    }


def write_store(run_dir: Path, rows: list[dict[str, Any]], parts: int = 2) -> Path:
    """Write `rows` as `parts` part files under RUN_DIR/parts (rows split in order)."""
    folder = Path(run_dir) / "parts"
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.parquet")))
    chunks = np.array_split(np.arange(len(rows)), parts)
    for index, chunk in enumerate(chunks):
        if len(chunk) == 0:
            continue
        table = pa.Table.from_pylist([rows[i] for i in chunk], schema=SCHEMA)
        pq.write_table(table, folder / f"part-{existing + index:05d}.parquet")
    return Path(run_dir)


def fixture_rows() -> list[dict[str, Any]]:
    """A hand-checkable store: 2 professions x {gender, race} x {sd, fd, biasmap@100/200}.

    Gender, nurse, sd: labels female, female, female, male -> p = (1/4, 3/4), RD = 0.5.
    Gender, chef, sd: male, male, female, (no label) -> p over 3 labelled = (2/3, 1/3).
    The expected values are written out in tests/test_audit_metrics.py.
    """
    rows = []
    gender = {
        # (profession, method, lambda): [(iou, biou per block, label), ...] per seed 0..3
        ("nurse", "sd", 0): [
            (0.40, [0.5, 0.3, 0.2, 0.6], "female"),
            (0.30, [0.4, 0.2, 0.2, 0.4], "female"),
            (0.50, [0.6, 0.4, 0.3, 0.7], "female"),
            (0.20, [0.3, 0.1, 0.1, 0.3], "male"),
        ],
        ("chef", "sd", 0): [
            (0.10, [0.2, 0.1, 0.1, 0.2], "male"),
            (0.20, [0.3, 0.2, 0.1, 0.2], "male"),
            (0.30, [0.4, 0.2, 0.2, 0.4], "female"),
            (0.40, [0.5, 0.3, 0.2, 0.4], None),
        ],
        ("nurse", "fd", 0): [
            (0.45, [0.5, 0.4, 0.2, 0.5], "female"),
            (0.35, [0.4, 0.3, 0.2, 0.5], "male"),
            (0.40, [0.5, 0.3, 0.3, 0.6], "female"),
            (0.30, [0.3, 0.2, 0.1, 0.4], "male"),
        ],
        ("chef", "fd", 0): [
            (0.25, [0.3, 0.2, 0.1, 0.3], "male"),
            (0.15, [0.2, 0.1, 0.1, 0.2], "female"),
            (0.35, [0.4, 0.3, 0.2, 0.4], "female"),
            (0.05, [0.1, 0.1, 0.0, 0.1], "female"),
        ],
    }
    for lam, shift in ((100, 0.1), (200, 0.15)):
        for profession in ("nurse", "chef"):
            gender[(profession, "biasmap", lam)] = [
                (max(0.0, iou - shift), [max(0.0, b - shift) for b in biou], label or "male")
                for iou, biou, label in gender[(profession, "sd", 0)]
            ]
    for (profession, method, lam), seeds in gender.items():
        for seed, (iou, biou, label) in enumerate(seeds):
            rows.append(
                make_row(
                    profession, "gender", seed, method, lambda_=lam, iou=iou, biou=biou, label=label
                )
            )
    race_labels = {"nurse": ["white", "white", "asian", "white"], "chef": ["black"] * 4}
    for profession, labels in race_labels.items():
        for seed, label in enumerate(labels):
            rows.append(
                make_row(
                    profession,
                    "race",
                    seed,
                    "sd",
                    iou=0.3 + 0.05 * seed,
                    biou=[0.4, 0.2, 0.3, 0.5],
                    label=label,
                )
            )
    return rows


def tiny_feature_net(seed: int = 0, features: int = 4, gain: float = 1.0):
    """A small random conv net in place of Inception: [B, 3, H, W] in [0, 1] -> [B, features].

    gain scales the output layer (FID scales with its square), for readable 2-digit values.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2),
        nn.Tanh(),
        nn.Conv2d(6, features, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    with torch.no_grad():
        net[2].weight.mul_(gain)
        net[2].bias.mul_(gain)
    return net


def write_row_images(run_dir: Path, rows: list[dict[str, Any]], size: int = 24) -> None:
    """A random PNG at every row's image_path; each method and lambda shifts the pixels."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for row in rows:
        shift = {"sd": 0.0, "fd": 0.1}.get(row["method"], -row["lambda_"] / 1000)
        pixels = np.clip(rng.random((size, size, 3)) * 0.6 + 0.2 + shift, 0, 1)
        path = Path(run_dir) / row["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)


def image_store_rows(run_dir: Path, seeds: int = 10, size: int = 32) -> list[dict[str, Any]]:
    """Rows with real PNGs under RUN_DIR/images: nurse and chef (gender) x {sd, fd, biasmap@100}.

    Each method shifts the pixel statistics differently, so the FIDs differ.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    shift = {"sd": 0.0, "fd": 0.15, "biasmap": -0.2}
    rows = []
    for profession in ("nurse", "chef"):
        for method, lambda_ in (("sd", 0.0), ("fd", 0.0), ("biasmap", 100.0)):
            for seed in range(seeds):
                base = rng.random((size, size, 3)) * 0.6 + 0.2 + shift[method]
                pixels = (np.clip(base, 0, 1) * 255).astype(np.uint8)
                relative = f"images/gender/{profession}/{method}_l{lambda_:g}_s{seed}.png"
                (run_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(run_dir / relative)
                label = "male" if (seed + len(method)) % 3 else "female"
                rows.append(
                    make_row(
                        profession,
                        "gender",
                        seed,
                        method,
                        lambda_=lambda_,
                        iou=0.2 + 0.01 * seed,
                        biou=[0.3, 0.2, 0.1, 0.4],
                        label=label,
                        image_path=relative,
                    )
                )
    return rows


def write_yaml(path: Path, data: dict) -> Path:
    """An audit config file holding `data`; returns its path."""
    path.write_text(yaml.safe_dump(data))
    return path


def small_config(output: Path, **fields) -> dict:
    """A grid small enough for seconds of CPU: 1 thread (2 threads on this busy 2-core box
    can wait whole scheduler slices at every parallel region)."""
    config = {
        "model": "tiny",
        "professions": ["doctor"],
        "axes": {"gender": {"concept": "gender", "classes": ["male", "female"]}},
        "seeds": "0-3",
        "methods": ["sd", "biasmap"],
        "lambdas": [100.0],
        "steps": 2,
        "batch_size": 2,
        "threads": 1,
        "clip_model": None,
        "output": str(output),
    }
    config.update(fields)
    return config
