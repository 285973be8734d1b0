"""`biasmap maps` end to end on the tiny pipeline: PNGs and a JSON that matches the API."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from typer.testing import CliRunner  # noqa: E402

import biasmap  # noqa: E402
from biasmap.cli import app  # noqa: E402
from biasmap.models import tiny_sd  # noqa: E402

PROMPT = "A photo of the face of a firefighter"
ATTRIBUTION = "A photo of the face of a firefighter and gender"


def test_maps_command_writes_pngs_and_iou_json(tmp_path):
    out = tmp_path / "maps"
    result = CliRunner().invoke(
        app,
        [
            "maps",
            "--model",
            "tiny",
            "--prompt",
            PROMPT,
            "--attribution",
            ATTRIBUTION,
            "--concepts",
            "gender",
            "firefighter",
            "--seed",
            "0",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("image_0.png", "overlay_0.png", "biou_0.png", "maps.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "maps.json").read_text())
    assert summary["concepts"] == ["gender", "firefighter"]
    assert set(summary["biou"]) == {"down-16", "down-8", "down-4", "up-4", "up-8", "up-16", "mean"}

    # The same generation through the Python API gives the same numbers.
    pipe = tiny_sd(0)
    with biasmap.trace(pipe, ATTRIBUTION, ["gender", "firefighter"]) as tr:
        pipe(PROMPT, num_inference_steps=2, generator=[torch.Generator().manual_seed(0)])
    maps = tr.maps()
    assert summary["iou"] == pytest.approx(maps.iou("gender", "firefighter").tolist())
    assert summary["biou"]["mean"] == pytest.approx(
        maps.biou("gender", "firefighter")["mean"].tolist()
    )


def test_maps_command_rejects_absent_concept(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "maps",
            "--prompt",
            PROMPT,
            "--attribution",
            ATTRIBUTION,
            "--concepts",
            "race,firefighter",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    # One line naming the option and the prompt's tokens, no traceback.
    assert result.exit_code == 2
    assert result.output.startswith("error: --concepts: Concept 'race'")
    assert "'gender'" in result.output and "Traceback" not in result.output
