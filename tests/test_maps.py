"""AttributionMaps: IoU / BIoU against masks computed by hand, resize, plots (no diffusers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biasmap.discovery.maps import AttributionMaps, aggregate_blocks


def hand_iou(x: np.ndarray, y: np.ndarray, q: float) -> float:
    """IoU of the masks map >= numpy percentile (q * 100), from index sets."""
    mask_x = set(np.flatnonzero(x.ravel() >= np.percentile(x, q * 100)))
    mask_y = set(np.flatnonzero(y.ravel() >= np.percentile(y, q * 100)))
    union = mask_x | mask_y
    return len(mask_x & mask_y) / len(union) if union else 0.0


@pytest.fixture
def random_maps():
    generator = torch.Generator().manual_seed(0)
    blocks = {
        name: torch.rand(3, 2, 8, 8, generator=generator)
        for name in ("down-8", "down-4", "up-4", "up-8")
    }
    return AttributionMaps(blocks, ["gender", "firefighter"])


def test_iou_known_masks():
    # a: left half hot, b: top half hot -> top-70% masks chosen by hand.
    a = torch.zeros(1, 1, 4, 5)
    a[..., :, :3] = 1.0  # 12 of 20 cells hot
    b = torch.zeros(1, 1, 4, 5)
    b[..., :2, :] = 1.0  # 10 of 20 cells hot
    maps = AttributionMaps({"up-4": torch.cat([a, b], dim=1)}, ["a", "b"])
    # The 70th percentile of a 0/1 map with >= 30% ones is 1, so the masks are the hot cells.
    # a & b = top rows of the left three columns = 6 cells; a | b = 12 + 10 - 6 = 16.
    assert maps.iou("a", "b", q=0.7).tolist() == [pytest.approx(6 / 16)]
    assert maps.biou("a", "b")["up-4"].tolist() == [pytest.approx(6 / 16)]
    assert maps.iou("a", "a").tolist() == [1.0]


def test_iou_and_biou_equal_hand_computation(random_maps):
    for q in (0.7, 0.5, 0.9):
        iou = random_maps.iou("gender", "firefighter", q)
        aggregate = random_maps.aggregate.numpy()
        expected = [hand_iou(aggregate[i, 0], aggregate[i, 1], q) for i in range(3)]
        np.testing.assert_allclose(iou.numpy(), expected, rtol=1e-6)
        biou = random_maps.biou(0, 1, q)
        assert list(biou) == ["down-8", "down-4", "up-4", "up-8", "mean"]
        per_block = []
        for name, block in random_maps.blocks.items():
            values = [hand_iou(block[i, 0].numpy(), block[i, 1].numpy(), q) for i in range(3)]
            np.testing.assert_allclose(biou[name].numpy(), values, rtol=1e-6)
            per_block.append(values)
        np.testing.assert_allclose(biou["mean"].numpy(), np.mean(per_block, axis=0), rtol=1e-6)


def test_strict_masks_and_concept_errors(random_maps):
    strict = random_maps.masks("gender", 0.7, inclusive=False)
    aggregate = random_maps.aggregate[:, 0].numpy()
    for i in range(3):
        threshold = np.percentile(aggregate[i], 70)
        assert (strict[i].numpy() == (aggregate[i] > threshold)).all()
    with pytest.raises(KeyError, match="race"):
        random_maps.iou("race", "gender")
    with pytest.raises(KeyError, match="mid-2"):
        random_maps.concept("gender", block="mid-2")


def test_aggregate_is_block_sum_and_resize_is_bilinear(random_maps):
    torch.testing.assert_close(random_maps.aggregate, sum(random_maps.blocks.values()))
    bigger = random_maps.resize((16, 12))
    assert bigger.aggregate.shape == (3, 2, 16, 12)
    expected = torch.nn.functional.interpolate(
        random_maps.blocks["up-8"], size=(16, 12), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(bigger.blocks["up-8"], expected)
    torch.testing.assert_close(bigger.aggregate, sum(bigger.blocks.values()))
    one = random_maps.select(1)
    torch.testing.assert_close(one.aggregate, random_maps.aggregate[1:2])
    assert random_maps.nbytes() == 5 * 3 * 2 * 8 * 8 * 4


def test_from_block_sums_resizes_each_block():
    sums = {"down-8": torch.rand(2, 1, 8, 8), "down-4": torch.rand(2, 1, 4, 4)}
    maps = AttributionMaps.from_block_sums(sums, (8, 8), ["gender"])
    torch.testing.assert_close(maps.blocks["down-8"], sums["down-8"])
    torch.testing.assert_close(
        maps.blocks["down-4"],
        torch.nn.functional.interpolate(
            sums["down-4"], size=(8, 8), mode="bilinear", align_corners=False
        ),
    )


def _bilinear(maps, size):
    return torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def test_two_stage_aggregation_sums_at_the_largest_block_then_expands():
    """OVAM's aggregation, against plain F.interpolate: blocks to the largest block resolution,
    summed, then the sum to the map size. Block maps are resized straight to the map size."""
    gen = torch.Generator().manual_seed(4)
    sums = {
        "down-16": torch.rand(2, 2, 16, 16, generator=gen, dtype=torch.float64),
        "down-8": torch.rand(2, 2, 8, 8, generator=gen, dtype=torch.float64),
        "up-4": torch.rand(2, 2, 4, 4, generator=gen, dtype=torch.float64),
    }
    size = (40, 40)
    stage_one = sum(_bilinear(block, (16, 16)) for block in sums.values())
    expected = _bilinear(stage_one, size)
    maps = AttributionMaps.from_block_sums(sums, size, ["a", "b"], aggregation="two-stage")
    torch.testing.assert_close(maps.aggregate, expected)
    torch.testing.assert_close(aggregate_blocks(list(sums.values()), size, "two-stage"), expected)
    for name, block in sums.items():
        torch.testing.assert_close(maps.blocks[name], _bilinear(block, size))
    # The paper's one-stage sum is another map: resizes do not compose.
    one_stage = AttributionMaps.from_block_sums(sums, size, ["a", "b"])
    torch.testing.assert_close(one_stage.aggregate, sum(_bilinear(b, size) for b in sums.values()))
    assert (one_stage.aggregate - expected).abs().max() > 1e-3
    # At the largest block resolution the two stages are one.
    torch.testing.assert_close(
        aggregate_blocks(list(sums.values()), (16, 16), "two-stage"), stage_one
    )
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_blocks(list(sums.values()), size, "three-stage")
    # Two-stage maps at the largest block resolution, resized later: OVAM's second stage.
    at_largest = AttributionMaps.from_block_sums(
        sums, (16, 16), ["a", "b"], aggregation="two-stage"
    )
    assert at_largest.meta["aggregation"] == "two-stage"
    torch.testing.assert_close(at_largest.resize(size).aggregate, expected)


def test_plots_render(random_maps, tmp_path):
    pytest.importorskip("matplotlib")
    image = torch.rand(3, 3, 32, 32)
    figure = random_maps.plot(
        image, "gender", "firefighter", index=2, path=tmp_path / "overlay.png"
    )
    assert len(figure.axes) == 6 and "IoU" in figure.axes[5].get_title()
    iou = float(random_maps.iou("gender", "firefighter")[2])
    assert f"{iou:.3f}" in figure.axes[5].get_title()
    chart = random_maps.plot_biou("gender", "firefighter", path=tmp_path / "biou.png")
    assert [t.get_text() for t in chart.axes[0].get_xticklabels()] == list(random_maps.blocks)
    assert (tmp_path / "overlay.png").stat().st_size > 0 and (
        tmp_path / "biou.png"
    ).stat().st_size > 0
