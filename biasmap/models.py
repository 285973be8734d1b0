"""Pipelines for discovery and guidance: real weights when present, random weights offline.

There is no model hub in CI or on the benchmark machines (DESIGN.md section 3), so:

- `tiny_sd` / `tiny_sdxl` build small random-weight pipelines of the real architecture
  families (SD1.x/SD2.x UNet + CLIP text encoder + KL VAE; SDXL with its two text
  encoders and micro-conditioning) for tests and the offline demo;
- `tiny_sd3` / `tiny_flux` do the same for the MM-DiT families (SD3/SD3.5's
  SD3Transformer2DModel with two CLIPs and a T5; Flux.1's FluxTransformer2DModel with
  double- and single-stream blocks, guidance embedding, a CLIP and a T5);
  `sd35_medium_transformer_config` / `flux1_dev_transformer_config` give the released
  full-size transformer shapes for GPU benchmarks;
- `random_sd15` builds the full SD1.5 architecture with random weights for benchmarks,
  since speed depends on shapes, not on weight values;
- `load_pipeline` loads real weights from a hub id or a local folder and, when they are
  not available, says how to supply them.

All random builders use the real CLIP BPE tokenizer, so concept words map to the same
token positions as with the released models. No T5 vocabulary is available offline, so
the tiny MM-DiT pipelines tokenise their T5 stream with the CLIP tokenizer too (their
tiny T5 encoders have CLIP's vocabulary size); code must always take a stream's
tokenizer from the pipeline, never assume which one it is.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
# The vocabulary is the 256 byte symbols, their end-of-word forms, one entry per merge
# and the two special tokens: 256 * 2 + 48894 + 2 = 49408 entries.
_CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 256 * 2 - 2

# Names load_pipeline accepts for the random-weight builders.
RANDOM_MODELS = ("tiny", "tiny-sd", "tiny-sd2", "tiny-sdxl", "tiny-sd3", "tiny-flux", "random-sd15")
# The planted world's trained pipeline and CLIP, shipped inside the package (biasmap.world).
PLANTED = "planted"
PLANTED_FOLDER = Path(__file__).parent / "world" / "weights"
PLANTED_TRAIN_COMMAND = (
    "python -m biasmap.world.train --out runs/planted --export biasmap/world/weights"
)

# The UNet layouts of the random-weight builders, as their unet/config.json would hold them:
# enough to name their cross-attention blocks without building them (see unet_layout).
_SD_BLOCK_TYPES = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
TINY_UNET_LAYOUT = {"sample_size": 16, **_SD_BLOCK_TYPES}
SD15_UNET_LAYOUT = {"sample_size": 64, **_SD_BLOCK_TYPES}
# SDXL's shape: a plain first down block, cross-attention below it.
TINY_SDXL_UNET_LAYOUT = {
    "sample_size": 16,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
# Every builder's VAE has four levels, as released SD models do.
VAE_SCALE_FACTOR = 8


# --------------------------------------------------------------------------- tokenizer


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE uses, in id order.

    Printable Latin-1 bytes stand for themselves; the others are shifted to code
    points 256.. so that every byte has a visible, non-whitespace symbol.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            code_points.append(256 + shifted)
            shifted += 1
    return [chr(c) for c in code_points]


def clip_bpe_file() -> Path:
    """Path of CLIP's `bpe_simple_vocab_16e6.txt.gz`, shipped inside open_clip_torch.

    open_clip is located without importing it: importing it pulls torchvision, which
    must stay out of this environment (DESIGN.md section 3).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The CLIP BPE vocabulary ships in the open_clip_torch package, which is not "
            "installed. Install it without its dependencies (they pull a CUDA torch): "
            "pip install --no-deps open-clip-torch ftfy"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    # Line 0 is a version header; the merges follow in priority order.
    merges = [tuple(line.split()) for line in lines[1 : 1 + _CLIP_NUM_MERGES]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (transformers CLIPTokenizer), built offline.

    pad_token: "<|endoftext|>" as SD1.x and SDXL's first tokenizer, or "!" as SD2.x and
    SDXL's second tokenizer. "a photo of a cat" -> 49406 320 1125 539 320 2368 49407.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=CLIP_MAX_LENGTH,
        pad_token=pad_token,
    )


# --------------------------------------------------------------------------- builders


def _clip_text_config(
    hidden: int, layers: int, heads: int, *, act: str = "quick_gelu", proj: int = 0
):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=act,
        projection_dim=proj or hidden,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=1,
    )


def _kl_vae(
    block_out_channels,
    layers_per_block: int,
    sample_size: int,
    norm_num_groups=32,
    *,
    mid_block_attention: bool = True,
    **extra_config,
):
    """An SD-style KL autoencoder with one level per entry of block_out_channels
    (vae_scale_factor 2 ** (levels - 1); SD's four give 8), random weights.

    extra_config: further AutoencoderKL arguments (SD3/Flux: 16 latent channels, shift and
    scaling factors, no quant convs)."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        mid_block_add_attention=mid_block_attention,
        **{"latent_channels": 4, **extra_config},
    )


def _tiny_vae():
    # Four levels like the real VAE, so vae_scale_factor is 8 and image sizes behave
    # as with released models; 8 channels keep it cheap.
    return _kl_vae((8, 8, 8, 8), 1, 128, norm_num_groups=4)


def _sd_scheduler():
    from diffusers import DDIMScheduler

    # SD1.5's noise schedule.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _eval_fp32(pipe):
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd(seed: int = 0, *, variant: str = "sd1"):
    """A small random-weight StableDiffusionPipeline (CPU, fp32), deterministic per seed.

    variant: "sd1" (SD1.x: conv proj_in, quick-GELU text encoder, eos padding) or
    "sd2" (SD2.x: linear proj_in, per-block head dims, GELU text encoder, "!" padding).
    UNet: three cross-attention down blocks and a plain one, like SD1.5, with 8 heads;
    latent 16x16 (128 px images), so the attn2 blocks are down-16, down-8, down-4,
    mid-2, up-4, up-8, up-16. Real CLIP tokenizer.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if variant not in ("sd1", "sd2"):
        raise ValueError(f"tiny_sd variant must be 'sd1' or 'sd2', got {variant!r}")
    sd2 = variant == "sd2"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(
            **TINY_UNET_LAYOUT,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            # SD1 passes a head count under this legacy name; SD2 passes per-block head dims.
            attention_head_dim=(2, 4, 4, 4) if sd2 else 8,
            use_linear_projection=sd2,
        )
        text_encoder = CLIPTextModel(
            _clip_text_config(32, 2, 4, act="gelu" if sd2 else "quick_gelu")
        )
        vae = _tiny_vae()
    finally:
        torch.random.set_rng_state(generator_state)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer("!" if sd2 else "<|endoftext|>"),
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _eval_fp32(pipe)


def tiny_sdxl(seed: int = 0):
    """A small random-weight StableDiffusionXLPipeline (CPU, fp32), deterministic per seed.

    Same structure as SDXL: a plain first down block, cross-attention with several
    transformer layers deeper down, two CLIP text encoders whose penultimate hidden
    states are concatenated (16 + 32 = 48 = cross_attention_dim), and text_time
    micro-conditioning fed by the second encoder's pooled projection. Latent 16x16
    (128 px); attn2 blocks down-8, down-4, mid-4, up-4, up-8.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pooled_dim, time_embed_dim = 32, 8
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(
            **TINY_SDXL_UNET_LAYOUT,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=48,
            attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # Six micro-conditioning scalars, each embedded, plus the pooled text embedding.
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        )
        text_encoder = CLIPTextModel(_clip_text_config(16, 2, 2))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(32, 2, 4, act="gelu", proj=pooled_dim)
        )
        vae = _tiny_vae()
    finally:
        torch.random.set_rng_state(generator_state)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer("<|endoftext|>"),
        tokenizer_2=clip_tokenizer("!"),
        unet=unet,
        scheduler=_sd_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    return _eval_fp32(pipe)


# --------------------------------------------------------------------------- MM-DiT builders

# Latent channels of the SD3 and Flux VAEs (16, where SD1.x/SDXL have 4), and their
# released scaling / shift factors, so latents are scaled exactly as with the real models.
DIT_LATENT_CHANNELS = 16
_SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
_FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
# Tiny MM-DiTs make 64 px images: an 8x8 latent, i.e. a 4x4 grid of image tokens (patch 2).
TINY_DIT_LATENT = 8
# Their block counts, which dit_block_names reads without building them: tiny-sd3's joint
# blocks; tiny-flux's double-stream (joint) and single-stream blocks.
TINY_SD3_LAYERS = 3
TINY_FLUX_LAYERS = (2, 2)


def _tiny_dit_vae(factors: dict[str, float]):
    # Four levels (vae_scale_factor 8) and 16 latent channels like the real SD3/Flux VAEs;
    # they have no quant convs.
    return _kl_vae(
        (8, 8, 8, 8),
        1,
        TINY_DIT_LATENT * VAE_SCALE_FACTOR,
        norm_num_groups=4,
        latent_channels=DIT_LATENT_CHANNELS,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **factors,
    )


def _tiny_t5(d_model: int):
    """A two-layer random T5 encoder over CLIP's vocabulary (the offline stand-in for T5's)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=CLIP_VOCAB_SIZE,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3 and Flux use
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=CLIP_EOS_ID,
        )
    )


def _t5_stand_in_tokenizer(max_length: int):
    """The CLIP tokenizer standing in for T5's, allowed the T5 stream's full length."""
    tokenizer = clip_tokenizer("!")
    tokenizer.model_max_length = max_length
    return tokenizer


def tiny_sd3(seed: int = 0):
    """A small random-weight StableDiffusion3Pipeline (CPU, fp32), deterministic per seed.

    SD3.5's structure: an SD3Transformer2DModel of 3 MM-DiT blocks (width 32, 2 heads of
    16, RMS q/k norms, a dual-attention first block like SD3.5-medium, the last block
    context_pre_only), patch 2; two CLIP text encoders with projection (penultimate
    states 16 + 16 concatenated, pooled 16 + 16) and a T5 encoder (d_model 32) whose
    sequence follows the CLIP one in the joint text stream; a 16-channel VAE; the flow-
    matching Euler scheduler with SD3's shift 3. Latent 8x8 (64 px): a 4x4 token grid.
    The T5 stream is tokenised with the CLIP tokenizer (no T5 vocabulary offline).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformer = SD3Transformer2DModel(
            sample_size=TINY_DIT_LATENT,
            patch_size=2,
            in_channels=DIT_LATENT_CHANNELS,
            num_layers=TINY_SD3_LAYERS,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            out_channels=DIT_LATENT_CHANNELS,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(16, 2, 2, proj=16))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(16, 2, 2, act="gelu", proj=16)
        )
        text_encoder_3 = _tiny_t5(32)
        vae = _tiny_dit_vae(_SD3_VAE_FACTORS)
    finally:
        torch.random.set_rng_state(generator_state)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer("<|endoftext|>"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_stand_in_tokenizer(256),
    )
    return _eval_fp32(pipe)


def tiny_flux(seed: int = 0):
    """A small random-weight FluxPipeline (CPU, fp32), deterministic per seed.

    Flux.1-dev's structure: a FluxTransformer2DModel with 2 double-stream and 2 single-
    stream blocks (width 32, 2 heads of 16, rotary axes 4+6+6), the guidance embedding
    (guidance-distilled, no true CFG by default); a CLIP text encoder that gives only the
    pooled embedding (16) and a T5 encoder (d_model 32) that gives the token stream; a
    16-channel VAE whose latents are packed 2x2; the flow-matching Euler scheduler with
    Flux's resolution-dependent shift. Default 64 px (latent 8x8, a 4x4 token grid);
    the T5 stream is tokenised with the CLIP tokenizer (no T5 vocabulary offline).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * DIT_LATENT_CHANNELS,  # 2x2 packed latent patches
            num_layers=TINY_FLUX_LAYERS[0],
            num_single_layers=TINY_FLUX_LAYERS[1],
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        text_encoder = CLIPTextModel(_clip_text_config(16, 2, 2))
        text_encoder_2 = _tiny_t5(32)
        vae = _tiny_dit_vae(_FLUX_VAE_FACTORS)
    finally:
        torch.random.set_rng_state(generator_state)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer("<|endoftext|>"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_stand_in_tokenizer(512),
        transformer=transformer,
    )
    # FluxPipeline's default size is default_sample_size * vae_scale_factor (1024 px for
    # the real model); the tiny one defaults to 64 px.
    pipe.default_sample_size = TINY_DIT_LATENT
    return _eval_fp32(pipe)


def sd15_unet():
    """SD1.5's UNet2DConditionModel (859.5M parameters), randomly initialised."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **SD15_UNET_LAYOUT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_text_encoder():
    """SD1.5's text encoder, CLIP ViT-L/14's text tower (123.1M parameters), random weights."""
    from transformers import CLIPTextModel

    return CLIPTextModel(_clip_text_config(768, 12, 12))


def sd15_vae():
    """SD1.5's KL autoencoder (83.7M parameters), randomly initialised."""
    return _kl_vae((128, 256, 512, 512), 2, 512)


def random_sd15(
    seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """The full SD1.5 architecture (UNet 860M, CLIP ViT-L/14 text encoder, KL VAE) with
    random weights, for benchmarks: speed depends on shapes, not on weight values.

    Nothing is downloaded. Building takes tens of seconds on CPU (random init of ~1B
    parameters) and about 4.3 GB in fp32.
    """
    from diffusers import StableDiffusionPipeline

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet, text_encoder, vae = sd15_unet(), sd15_text_encoder(), sd15_vae()
    finally:
        torch.random.set_rng_state(generator_state)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = _eval_fp32(pipe)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def sd35_medium_transformer_config() -> dict[str, Any]:
    """SD3.5-medium's SD3Transformer2DModel config (2.24B parameters; MMDiT-X: dual
    attention in the first 13 of 24 blocks, RMS q/k norms), as released.

    For GPU benchmarks: `SD3Transformer2DModel(**sd35_medium_transformer_config())` builds
    it with random weights (speed depends on shapes, not values). Never build it in tests.
    """
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    }


def flux1_dev_transformer_config() -> dict[str, Any]:
    """Flux.1-dev's FluxTransformer2DModel config (11.9B parameters: 19 double-stream and
    38 single-stream blocks of width 3072, guidance embedding), as released.

    For GPU benchmarks only: `FluxTransformer2DModel(**flux1_dev_transformer_config())`
    (about 24 GB in bf16). Never build it in tests.
    """
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }


def random_dit_transformer(
    family: str,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
):
    """The full-size random-weight transformer of family "sd3.5-medium" or "flux.1-dev",
    built directly on `device` in `dtype`, for GPU benchmarks of the denoiser's per-step
    cost (the text encoders run once per generation and are left out)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    builders = {
        "sd3.5-medium": (SD3Transformer2DModel, sd35_medium_transformer_config),
        "flux.1-dev": (FluxTransformer2DModel, flux1_dev_transformer_config),
    }
    if family not in builders:
        raise ValueError(f"family must be one of {sorted(builders)}, got {family!r}")
    model_class, config = builders[family]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = model_class(**config())
        finally:
            torch.set_default_dtype(default_dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- loading


class ModelNotAvailableError(OSError):
    """Raised when a model's weights are neither in a local folder nor downloadable."""


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def resolve_source(
    name_or_path: str, local_files_only: bool | None, hint: str, *, what: str
) -> tuple[bool, bool]:
    """(local_files_only, is_folder) for a `from_pretrained` source.

    local_files_only None follows HF_HUB_OFFLINE. A name that looks like a path (starts with
    ".", "/" or "~") but is no folder raises ModelNotAvailableError("<what> folder ... does not
    exist. <hint>") instead of a hub lookup error about an invalid repository id.
    """
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    is_folder = os.path.isdir(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path
    if looks_local and not is_folder:
        raise ModelNotAvailableError(f"{what} folder {name_or_path!r} does not exist. {hint}")
    return local_files_only, is_folder


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Raise ModelNotAvailableError unless `folder` is a diffusers pipeline folder (it holds
    model_index.json), so a wrong folder fails with one sentence, not a loader traceback."""
    if not (Path(os.path.expanduser(folder)) / "model_index.json").is_file():
        raise ModelNotAvailableError(
            f"Model folder {str(folder)!r} is not a diffusers pipeline (it has no "
            "model_index.json); give the folder written by `pipe.save_pretrained(folder)` or "
            "`huggingface-cli download <model-id> --local-dir <folder>`"
        )


def unet_layout(name_or_path: str) -> tuple[dict[str, Any], int] | None:
    """(UNet config, VAE scale factor) of a pipeline, read without loading its weights.

    Known for the random-weight builders, the planted model and local pipeline folders
    (their unet/config.json and vae/config.json); None for hub ids and folders without a
    readable unet config, whose layout only loading tells.
    """
    import json

    if name_or_path in ("tiny", "tiny-sd", "tiny-sd2"):
        return dict(TINY_UNET_LAYOUT), VAE_SCALE_FACTOR
    if name_or_path == "tiny-sdxl":
        return dict(TINY_SDXL_UNET_LAYOUT), VAE_SCALE_FACTOR
    if name_or_path == "random-sd15":
        return dict(SD15_UNET_LAYOUT), VAE_SCALE_FACTOR
    folder = PLANTED_FOLDER / "pipeline" if name_or_path == PLANTED else None
    if folder is None and os.path.isdir(os.path.expanduser(name_or_path)):
        folder = Path(os.path.expanduser(name_or_path))
    if folder is None:
        return None
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        scale = VAE_SCALE_FACTOR
    return unet, scale


def dit_block_names(name_or_path: str) -> list[str] | None:
    """The MM-DiT block names (`joint-i`, then Flux's `single-i`, as biasmap.trace names
    them) of what load_pipeline(name_or_path) loads, read without loading weights.

    Known for tiny-sd3 / tiny-flux and local folders whose transformer/config.json is an
    SD3Transformer2DModel or FluxTransformer2DModel config; None for UNet models, hub ids
    and unreadable folders. Unlike a UNet's, the names do not depend on the image size.
    """
    import json

    if name_or_path == "tiny-sd3":
        joint, single = TINY_SD3_LAYERS, 0
    elif name_or_path == "tiny-flux":
        joint, single = TINY_FLUX_LAYERS
    elif os.path.isdir(os.path.expanduser(name_or_path)):
        folder = Path(os.path.expanduser(name_or_path))
        try:
            config = json.loads((folder / "transformer" / "config.json").read_text())
            kind = config["_class_name"]
            joint = int(config["num_layers"])
            single = int(config.get("num_single_layers", 0))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if kind == "SD3Transformer2DModel":
            single = 0
        elif kind != "FluxTransformer2DModel":
            return None
    else:
        return None
    return [f"joint-{i}" for i in range(joint)] + [f"single-{i}" for i in range(single)]


# The family of each diffusers pipeline class biasmap runs, in the words reports use.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "SD1.x/SD2.x UNet",
    "StableDiffusionXLPipeline": "SDXL UNet",
    "StableDiffusion3Pipeline": "SD3 (MM-DiT)",
    "FluxPipeline": "Flux.1 (MM-DiT)",
}
_BUILDER_PIPELINES = {
    "tiny": "StableDiffusionPipeline",
    "tiny-sd": "StableDiffusionPipeline",
    "tiny-sd2": "StableDiffusionPipeline",
    "tiny-sdxl": "StableDiffusionXLPipeline",
    "tiny-sd3": "StableDiffusion3Pipeline",
    "tiny-flux": "FluxPipeline",
    "random-sd15": "StableDiffusionPipeline",
}


def pipeline_family(pipeline_class: str) -> str:
    """The model family of a diffusers pipeline class name ("StableDiffusionXLPipeline" ->
    "SDXL UNet"); a class biasmap does not know is named as it is."""
    return PIPELINE_FAMILIES.get(pipeline_class, pipeline_class)


def model_family(name_or_path: str) -> str | None:
    """The family of what load_pipeline(name_or_path) loads, read without loading weights
    ("SDXL UNet", "Flux.1 (MM-DiT)"); None when nothing tells (see pipeline_class_name)."""
    class_name = pipeline_class_name(name_or_path)
    return pipeline_family(class_name) if class_name is not None else None


def pipeline_class_name(name_or_path: str) -> str | None:
    """The diffusers pipeline class ("FluxPipeline") load_pipeline(name_or_path) loads, read
    without loading weights.

    Known for the random-weight builders; the planted model and local folders tell by their
    model_index.json's _class_name, hub ids by the model_index.json in the local hub cache.
    None when nothing tells (a hub id never downloaded here, an unreadable folder).
    """
    import json

    if name_or_path in _BUILDER_PIPELINES:
        return _BUILDER_PIPELINES[name_or_path]
    index = None
    if name_or_path == PLANTED:
        index = PLANTED_FOLDER / "pipeline" / "model_index.json"
    elif os.path.isdir(os.path.expanduser(name_or_path)):
        index = Path(os.path.expanduser(name_or_path)) / "model_index.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "model_index.json")
        except ValueError:  # not a valid repo id: nothing tells
            cached = None
        index = Path(cached) if isinstance(cached, str) else None
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return None
    return class_name if isinstance(class_name, str) else None


def planted_folder(part: str) -> Path:
    """Folder of the shipped planted-world model: part "pipeline" (diffusers) or "clip"
    (transformers). Raises ModelNotAvailableError, naming the command that trains it, when
    this checkout has no trained weights."""
    folder = PLANTED_FOLDER / part
    if not (folder / ("model_index.json" if part == "pipeline" else "config.json")).is_file():
        raise ModelNotAvailableError(
            f"the planted world's trained {part} is not in {folder}; train and export it with "
            f"`{PLANTED_TRAIN_COMMAND}`"
        )
    return folder


@contextlib.contextmanager
def quiet_loading():
    """Silence diffusers' and transformers' progress bars, notices and deprecation warnings
    while loading the shipped model: the demo's output should be the audit's, not theirs."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


@functools.lru_cache(maxsize=1)
def planted_weights_digest() -> str:
    """A 12-hex-digit digest of the shipped planted weights ("absent" without them)."""
    import hashlib

    files = sorted(PLANTED_FOLDER.glob("*/**/*.safetensors"))
    if not files:
        return "absent"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(PLANTED_FOLDER).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _dtype_argument(torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype keyword: `dtype` where diffusers has deprecated `torch_dtype`
    (its deprecation warning would otherwise follow every load)."""
    from diffusers.utils import deprecation_utils

    # The resolver of the two keywords exists exactly where `dtype` is accepted.
    supports_dtype = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype" if supports_dtype else "torch_dtype": torch_dtype}


def load_pipeline(
    name_or_path: str,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    local_files_only: bool | None = None,
    **from_pretrained_kwargs: Any,
):
    """Load a diffusers text-to-image pipeline: a random-weight builder, a local folder or a hub id.

    name_or_path: "planted" (the planted world's trained model shipped with biasmap: 32 px
    images, v-prediction; see biasmap.world), one of RANDOM_MODELS ("tiny" = tiny_sd,
    "tiny-sd2", "tiny-sdxl", "tiny-sd3", "tiny-flux", "random-sd15"; `seed` seeds their
    weights), a folder saved with
    `save_pretrained` / downloaded from the hub, or a hub id such as
    "stable-diffusion-v1-5/stable-diffusion-v1-5".
    local_files_only: None follows HF_HUB_OFFLINE; True never touches the network.
    Raises ModelNotAvailableError, saying how to supply the weights, when they cannot be found.
    """
    torch_dtype = _resolve_dtype(dtype)
    builders = {
        "tiny": tiny_sd,
        "tiny-sd": tiny_sd,
        "tiny-sd2": functools.partial(tiny_sd, variant="sd2"),
        "tiny-sdxl": tiny_sdxl,
        "tiny-sd3": tiny_sd3,
        "tiny-flux": tiny_flux,
    }
    if name_or_path in builders:
        pipe = builders[name_or_path](seed)
        # Builders make fp32 modules; casting only when asked avoids diffusers' cast warning.
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
        return pipe.to(device)
    if name_or_path == "random-sd15":
        return random_sd15(seed, dtype=torch_dtype, device=device)

    from diffusers import DiffusionPipeline

    if name_or_path == PLANTED:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(
                planted_folder("pipeline"), **_dtype_argument(torch_dtype), local_files_only=True
            )
        return _eval_fp32(pipe).to(device)

    local_files_only, is_folder = resolve_source(
        name_or_path,
        local_files_only,
        "Pass a folder written by `pipe.save_pretrained(folder)` or by `huggingface-cli download "
        f"<model-id> --local-dir <folder>`, a hub id, or one of the offline random-weight models "
        f"{RANDOM_MODELS}.",
        what="Model",
    )
    if is_folder:
        check_pipeline_folder(name_or_path)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            name_or_path,
            **_dtype_argument(torch_dtype),
            local_files_only=local_files_only or is_folder,
            **from_pretrained_kwargs,
        )
    except (OSError, ValueError) as error:
        where = (
            "in that folder"
            if is_folder
            else "in the local Hugging Face cache, and the hub is unreachable"
        )
        raise ModelNotAvailableError(
            f"Could not load the weights of {name_or_path!r} ({where}): {error}\n"
            "To supply them offline: on a machine with internet run "
            f"`huggingface-cli download {name_or_path} --local-dir <folder>` (or "
            "`DiffusionPipeline.from_pretrained(...).save_pretrained(<folder>)`), copy the "
            "folder here and pass its path; or copy a Hugging Face cache and point HF_HOME at "
            f"it. Without weights, use a random-weight model: {RANDOM_MODELS}."
        ) from error
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
