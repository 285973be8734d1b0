"""Offline model builders: real CLIP tokenizer, determinism, SD1.5 architecture, load errors."""

from __future__ import annotations

import os
import time

import pytest
import torch

pytest.importorskip("diffusers")

from biasmap import models  # noqa: E402


def test_real_clip_tokenizer_ids():
    tokenizer = models.clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    padded = models.clip_tokenizer("!")("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and padded[4:] == [0] * 73


def test_tiny_pipelines_deterministic_per_seed():
    first, again, other = models.tiny_sd(0), models.tiny_sd(0), models.tiny_sd(1)
    for name, weight in first.unet.state_dict().items():
        assert torch.equal(weight, again.unet.state_dict()[name]), name
    assert not torch.equal(first.unet.conv_in.weight, other.unet.conv_in.weight)
    state = torch.random.get_rng_state()
    models.tiny_sdxl(0)
    assert torch.equal(state, torch.random.get_rng_state()), (
        "builders must not consume the global RNG"
    )
    images = [
        first(
            "a cat",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        for _ in range(2)
    ]
    assert torch.equal(images[0], images[1])


def test_tiny_sdxl_is_sdxl_family():
    pipe = models.tiny_sdxl(0)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert pipe.tokenizer_2.pad_token == "!"


def test_tiny_sdxl_layout_is_its_unet_config_and_names_its_blocks():
    from biasmap.discovery.trace import cross_attention_block_names

    layout, scale = models.unet_layout("tiny-sdxl")
    config = models.tiny_sdxl(0).unet.config
    for key, value in layout.items():
        built = config[key]
        assert (tuple(built) if isinstance(value, tuple) else built) == value, key
    assert cross_attention_block_names(layout, 16, 16) == [
        "down-8",
        "down-4",
        "mid-4",
        "up-4",
        "up-8",
    ]


def test_model_family_is_read_without_loading_and_agrees_with_the_adapter(tmp_path):
    from biasmap.mitigation.adapters import adapter_for

    for name, family in (
        ("tiny", "SD1.x/SD2.x UNet"),
        ("tiny-sdxl", "SDXL UNet"),
        ("tiny-sd3", "SD3 (MM-DiT)"),
        ("tiny-flux", "Flux.1 (MM-DiT)"),
    ):
        assert models.model_family(name) == family
        assert adapter_for(models.load_pipeline(name)).family == family
    folder = tmp_path / "xl"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert models.model_family(str(folder)) == "SDXL UNet"
    assert models.model_family(str(tmp_path)) is None  # no model_index.json
    assert models.model_family("nobody/never-downloaded-here") is None


@pytest.mark.parametrize(("name", "family"), [("tiny-sd3", "sd3"), ("tiny-flux", "flux")])
def test_dit_block_names_are_read_without_loading_and_are_the_trace_names(name, family, tmp_path):
    from biasmap.discovery.dit import dit_blocks

    pipe = models.load_pipeline(name)
    built = [block.name for block in dit_blocks(pipe.transformer, family)]
    assert models.dit_block_names(name) == built
    pipe.transformer.save_config(tmp_path / "transformer")  # a pipeline folder's config only
    assert models.dit_block_names(str(tmp_path)) == built
    assert models.dit_block_names("tiny-sdxl") is None
    assert models.dit_block_names("nobody/never-downloaded-here") is None


def test_sd15_architecture_parameter_counts():
    # The released SD1.5 components have exactly these parameter counts; meta tensors cost nothing.
    with torch.device("meta"):
        assert sum(p.numel() for p in models.sd15_unet().parameters()) == 859_520_964
        assert sum(p.numel() for p in models.sd15_text_encoder().parameters()) == 123_060_480
        assert sum(p.numel() for p in models.sd15_vae().parameters()) == 83_653_863


def test_load_pipeline_offline_errors(tmp_path):
    with pytest.raises(models.ModelNotAvailableError, match="save_pretrained"):
        models.load_pipeline(str(tmp_path / "missing-model"))
    with pytest.raises(models.ModelNotAvailableError, match="huggingface-cli download"):
        models.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", local_files_only=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(models.ModelNotAvailableError, match="not a diffusers pipeline"):
        models.load_pipeline(str(empty))


def test_load_pipeline_round_trip_from_folder(tmp_path):
    pipe = models.load_pipeline("tiny", seed=3)
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = models.load_pipeline(str(tmp_path / "tiny"), dtype="fp32")
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert loaded.tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids


@pytest.mark.slow
def test_tiny_pipeline_under_a_second_per_five_steps():
    if os.environ.get("BIASMAP_TIMING") != "1":
        pytest.skip("wall-clock check: run with BIASMAP_TIMING=1 on an otherwise idle machine")
    pipe = models.tiny_sd(0)
    pipe("warm up", num_inference_steps=1)
    best = min(
        _timed(lambda: pipe("a cat", num_inference_steps=5, output_type="pt")) for _ in range(3)
    )
    assert best < 1.0, best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
