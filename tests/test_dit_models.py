"""Offline MM-DiT builders: tiny SD3 / Flux pipelines and the full-size transformer configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from biasmap import models  # noqa: E402


def _generate(pipe, seed=0, **kwargs):
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=16,
        **kwargs,
    ).images


def test_tiny_sd3_is_sd35_family(sd3):
    assert type(sd3).__name__ == "StableDiffusion3Pipeline"
    assert type(sd3.transformer).__name__ == "SD3Transformer2DModel"
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    config = sd3.transformer.config
    # The CLIP states (16 + 16 channels) fill the joint dim; the T5 stream has the same width.
    assert (
        sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
        == config.joint_attention_dim
        == sd3.text_encoder_3.config.d_model
    )
    assert config.qk_norm == "rms_norm" and tuple(config.dual_attention_layers) == (0,)
    assert sd3.transformer.transformer_blocks[-1].context_pre_only
    assert sd3.vae.config.latent_channels == config.in_channels == 16
    # No T5 vocabulary offline: the T5 stream is tokenised by CLIP's BPE, padded to T5 lengths.
    assert sd3.tokenizer_3("a cat").input_ids == [49406, 320, 2368, 49407]
    assert sd3.tokenizer_3.model_max_length == 256


def test_tiny_flux_is_flux_dev_family(flux):
    assert type(flux).__name__ == "FluxPipeline"
    config = flux.transformer.config
    assert config.guidance_embeds and config.num_layers == 2 and config.num_single_layers == 2
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert flux.text_encoder_2.config.d_model == config.joint_attention_dim
    assert flux.text_encoder.config.hidden_size == config.pooled_projection_dim
    assert flux.scheduler.config.use_dynamic_shifting
    assert flux.tokenizer_2.model_max_length == 512


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_tiny_dits_generate_64px_deterministically(name):
    state = torch.random.get_rng_state()
    first, again, other = (models.load_pipeline(name, seed=s) for s in (0, 0, 1))
    assert torch.equal(state, torch.random.get_rng_state()), "builders must not consume the RNG"
    images = _generate(first)
    assert images.shape == (1, 3, 64, 64)
    assert torch.equal(images, _generate(again))
    assert not torch.equal(images, _generate(other))


def test_full_size_transformer_configs_have_released_sizes():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    # Built on the meta device only: the real sizes would need 9 GB / 48 GB of memory.
    with torch.device("meta"):
        sd35 = SD3Transformer2DModel(**models.sd35_medium_transformer_config())
        flux = FluxTransformer2DModel(**models.flux1_dev_transformer_config())
    assert sum(p.numel() for p in sd35.parameters()) == 2_243_171_520
    assert sum(p.numel() for p in flux.parameters()) == 11_901_408_320
    assert len(sd35.transformer_blocks) == 24 and sd35.inner_dim == 1536
    assert len(flux.transformer_blocks) == 19 and len(flux.single_transformer_blocks) == 38
    with pytest.raises(ValueError, match="family must be one of"):
        models.random_dit_transformer("sd3-large")
