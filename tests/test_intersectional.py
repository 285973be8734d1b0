"""Intersectional audit axes (several demographic concept words traced together): the config
syntax, the rows' per-concept and intersection IoU against a computation written here, RD over
the product classes, the report's table, and the guidance energy (tiny pipeline, CPU)."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from audit_fixtures import write_yaml  # noqa: E402

from biasmap.audit.config import ConfigError, load_config  # noqa: E402
from biasmap.audit.runner import run_audit  # noqa: E402
from biasmap.audit.store import ResultsStore  # noqa: E402
from biasmap.report import write_report  # noqa: E402

RACES = ["white", "black", "Hispanic", "Asian"]
JOINT_AXIS = {"concept": ["gender", "race"], "classes": [["male", "female"], RACES]}
TINY_BLOCKS = 6
JOINT_OVERRIDE = f"axes={{gender+race: {JOINT_AXIS}}}"


def joint_config(output: Path, **fields) -> dict:
    config = {
        "model": "tiny",
        "professions": ["doctor", "nurse"],
        "axes": {"gender+race": JOINT_AXIS},
        "seeds": "0-2",
        "methods": ["sd", "biasmap"],
        "lambdas": [100.0],
        "steps": 2,
        "batch_size": 3,
        "threads": 1,
        "clip_model": None,
        "output": str(output),
    }
    config.update(fields)
    return config


class PromptRecorder:
    """A stand-in for CLIP: records the class prompts it is given and labels each image by a
    fixed rule on its pixels (a softmax over class j of channel j % 3's mean, scaled by j + 1)."""

    prompts: list[str] = []

    def classify(self, images, class_prompts):
        PromptRecorder.prompts = list(class_prompts)
        probs = []
        for image in images:
            means = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0).mean(dim=(0, 1))
            logits = torch.stack([means[j % 3] * (j + 1) * 10 for j in range(len(class_prompts))])
            probs.append(torch.softmax(logits, dim=0))
        return torch.stack(probs)


def recorder(config, device):
    return PromptRecorder()


def hard_masks(maps: np.ndarray, q: float) -> torch.Tensor:
    """bool [..., n]: map >= its linear q-quantile, per map, in plain torch (float32)."""
    values = torch.from_numpy(maps.astype(np.float32)).flatten(-2)
    return values >= torch.quantile(values, q, dim=-1, keepdim=True)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 0.0


# --------------------------------------------------------------------------- config


def test_config_syntax_gives_product_classes_and_prompts():
    config = load_config(None, [JOINT_OVERRIDE])
    axis = config.axes["gender+race"]
    assert axis.concepts == ["gender", "race"] and axis.intersectional
    expected = [f"{g} {r}" for g, r in itertools.product(["male", "female"], RACES)]
    assert axis.class_names() == expected
    assert "a photo of the face of a female Asian person" in axis.prompts_for_clip()
    # One-word axes are unchanged, so their config hash is too.
    assert (
        load_config(None).config_hash
        == load_config(None, ["axes.gender.concept=gender"]).config_hash
    )


@pytest.mark.parametrize(
    ("axes", "expected"),
    [
        ("{gender+race: {concept: [gender, race], classes: [male, female]}}", "one class list"),
        ("{gender: {concept: gender, classes: [[male, female], [a, b]]}}", "one-word concept"),
        ("{gender+race: {concept: [gender], classes: [[male, female]]}}", "at least two"),
        ("{gender+race: {concept: [gender, race], classes: [[male], [a, b]]}}", "two classes"),
        ("{gender+colour: {concept: [gender, colour], classes: [[a, b], [c, d]]}}", "gender+race"),
    ],
)
def test_bad_intersectional_axes_say_what_is_accepted(axes, expected):
    with pytest.raises(ConfigError, match="axes") as error:
        load_config(None, [f"axes={axes}"])
    assert expected in str(error.value)


def test_fair_diffusion_refuses_an_intersection():
    with pytest.raises(ConfigError, match="Fair Diffusion"):
        load_config(None, [JOINT_OVERRIDE, "methods=[sd, fd]"])


# --------------------------------------------------------------------------- audit


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("joint")
    config = load_config(write_yaml(tmp_path / "c.yaml", joint_config(tmp_path / "run")))
    run_audit(config, classifier_factory=recorder, progress=False)
    return config, ResultsStore(config.output).read_table()


def test_rows_hold_each_concept_and_the_intersection_against_a_direct_computation(joint_run):
    config, table = joint_run
    assert table.num_rows == 12
    intersection_differs = False
    for row in table.to_pylist():
        profession = row["profession"]
        assert row["maps_concepts"] == ["gender", "race", profession]
        assert (
            row["attribution_prompt"]
            == f"A photo of the face of a {profession} and gender and race"
        )
        maps = np.frombuffer(row["maps"], dtype="<f2").reshape(row["maps_shape"])
        assert maps.shape == (1 + TINY_BLOCKS, 3, 16, 16)
        masks = hard_masks(maps, config.q)  # [views, concepts, n]
        gender, race, job = masks[0, 0], masks[0, 1], masks[0, 2]
        assert row["concept_ious"] == pytest.approx([iou(gender, job), iou(race, job)], abs=1e-7)
        assert row["iou"] == pytest.approx(iou(gender & race, job), abs=1e-7)
        blocks = [iou(masks[v, 0] & masks[v, 1], masks[v, 2]) for v in range(1, 1 + TINY_BLOCKS)]
        np.testing.assert_allclose(row["biou_values"], blocks, atol=1e-7)
        intersection_differs |= abs(row["iou"] - row["concept_ious"][0]) > 1e-6
    assert intersection_differs  # the intersection is not just the first concept's IoU


def test_rd_runs_over_the_product_classes(joint_run):
    config, table = joint_run
    classes = [f"{g} {r}" for g, r in itertools.product(["male", "female"], RACES)]
    assert PromptRecorder.prompts == [f"a photo of the face of a {c} person" for c in classes]
    html = write_report(config.output)
    rows = list(
        csv.DictReader((html.parent / "tables" / "table-professions-gender+race.csv").open())
    )
    for row in rows:
        labels = [
            r["clip_label"]
            for r in table.to_pylist()
            if r["profession"] == row["profession"] and r["method"] == "sd"
        ]
        assert all(r["clip_classes"] == classes for r in table.to_pylist())
        frequencies = [labels.count(c) / len(labels) for c in classes]
        assert float(row["RD / sd"]) == pytest.approx(max(frequencies) - min(frequencies))


def test_report_has_the_intersection_table(joint_run):
    config, table = joint_run
    html = write_report(config.output)
    assert 'id="table-intersection-gender-race"' in html.read_text()
    rows = list(
        csv.DictReader((html.parent / "tables" / "table-intersection-gender-race.csv").open())
    )
    pooled = next(r for r in rows if r["method"] == "sd" and r["profession"] == "all (mean)")
    sd = [r for r in table.to_pylist() if r["method"] == "sd"]

    def pooled_mean(value):
        return np.mean(
            [np.mean([value(r) for r in sd if r["profession"] == p]) for p in ("doctor", "nurse")]
        )

    assert float(pooled["IoU(gender, profession)"]) == pytest.approx(
        pooled_mean(lambda r: r["concept_ious"][0])
    )
    assert float(pooled["IoU(race, profession)"]) == pytest.approx(
        pooled_mean(lambda r: r["concept_ious"][1])
    )
    assert float(pooled["IoU(gender ∩ race, profession)"]) == pytest.approx(
        pooled_mean(lambda r: r["iou"])
    )
    assert pooled["IoU(gender ∩ race, profession)_ci_low"] != ""


# --------------------------------------------------------------------------- guidance


def test_energy_of_an_intersection_is_the_mean_of_each_concepts_energy():
    from biasmap.mitigation.presets import PRESETS
    from biasmap.mitigation.sampler import _energy

    torch.manual_seed(0)
    step_maps = {"down-8": torch.rand(2, 3, 8, 8), "up-16": torch.rand(2, 3, 16, 16)}
    settings = PRESETS["paper"]
    joint = _energy(step_maps, (16, 16), settings, 0.7)
    first = _energy({k: v[:, [0, 2]] for k, v in step_maps.items()}, (16, 16), settings, 0.7)
    second = _energy({k: v[:, [1, 2]] for k, v in step_maps.items()}, (16, 16), settings, 0.7)
    torch.testing.assert_close(joint, (first + second) / 2)
    assert not torch.allclose(first, second)
