"""MM-DiT pipelines (SD3.5, Flux.1) at three sizes for the trace and guidance benchmarks.

  tiny  biasmap.models.tiny_sd3 / tiny_flux: width 32, 3 (SD3) or 2 + 2 (Flux) blocks. At
        64 px the image has 16 tokens and the text 333 (SD3: 77 CLIP + 256 T5) or 512
        (Flux: T5), so the text side dominates every block: no real model runs like that.
  mid   the tiny pipeline's text encoders, VAE and scheduler with a wider, deeper random
        transformer (width 256 = 4 heads of 64; SD3: 4 joint blocks, the first dual-
        attention; Flux: 2 double- and 4 single-stream blocks). At 512 px the image has
        1024 tokens against the same text, the ratio of SD3 at 512-1024 px and Flux at
        512 px, so the trace's share of the work is a real model's while a step still
        runs on a CPU in about a second.
  full  the released SD3.5-medium / Flux.1-dev transformer (biasmap.models.
        random_dit_transformer, random weights) with small random text encoders whose
        output widths match it (T5 width 4096, SD3 pooled 768 + 1280, Flux pooled 768).
        GPU only: 2.2B / 11.9B parameters.

The text encoders run once per generation; the transformer's shapes decide the per-step
cost, which is what the targets are about.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from biasmap import models  # noqa: E402

FAMILIES = {"sd3": "sd3.5-medium", "flux": "flux.1-dev"}
SIZES = ("tiny", "mid", "full")
MID_WIDTH_HEADS = 4
MID_HEAD_DIM = 64


def dit_pipeline(family: str, size: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """A StableDiffusion3Pipeline (family "sd3") or FluxPipeline ("flux") of `size` (see the
    module docstring), random weights, seed 0, in `dtype` on `device`."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    pipe = models.tiny_sd3(0) if family == "sd3" else models.tiny_flux(0)
    if size == "mid":
        pipe.register_modules(transformer=_mid_transformer(family, pipe))
    elif size == "full":
        _widen_text_encoders(pipe, family)
        transformer = models.random_dit_transformer(FAMILIES[family], dtype=dtype, device=device)
        pipe.register_modules(transformer=transformer)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def _mid_transformer(family: str, pipe) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    tiny = pipe.transformer.config
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        if family == "sd3":
            model = SD3Transformer2DModel(
                sample_size=64,
                patch_size=2,
                in_channels=tiny.in_channels,
                num_layers=4,
                attention_head_dim=MID_HEAD_DIM,
                num_attention_heads=MID_WIDTH_HEADS,
                joint_attention_dim=tiny.joint_attention_dim,
                caption_projection_dim=MID_WIDTH_HEADS * MID_HEAD_DIM,
                pooled_projection_dim=tiny.pooled_projection_dim,
                out_channels=tiny.out_channels,
                pos_embed_max_size=96,  # up to a 96x96 patch grid (1536 px)
                dual_attention_layers=(0,),
                qk_norm="rms_norm",
            )
        else:
            model = FluxTransformer2DModel(
                patch_size=1,
                in_channels=tiny.in_channels,
                num_layers=2,
                num_single_layers=4,
                attention_head_dim=MID_HEAD_DIM,
                num_attention_heads=MID_WIDTH_HEADS,
                joint_attention_dim=tiny.joint_attention_dim,
                pooled_projection_dim=tiny.pooled_projection_dim,
                guidance_embeds=True,
                axes_dims_rope=(8, 28, 28),  # sums to the head dim, as Flux's (16, 56, 56)
            )
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval().requires_grad_(False)


def _widen_text_encoders(pipe, family: str) -> None:
    """Random text encoders whose outputs have the full-size transformer's input widths."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        t5 = models._tiny_t5(4096)  # joint_attention_dim of both released transformers
        if family == "sd3":
            # pooled: 768 + 1280 = pooled_projection_dim 2048; the CLIP states are padded
            # to T5's width by the pipeline.
            pipe.register_modules(
                text_encoder=CLIPTextModelWithProjection(
                    models._clip_text_config(16, 2, 2, proj=768)
                ),
                text_encoder_2=CLIPTextModelWithProjection(
                    models._clip_text_config(16, 2, 2, act="gelu", proj=1280)
                ),
                text_encoder_3=t5,
            )
        else:
            # Flux's pooled vector is CLIP's pooler output: hidden width 768.
            pipe.register_modules(
                text_encoder=CLIPTextModel(models._clip_text_config(768, 1, 12)),
                text_encoder_2=t5,
            )
    finally:
        torch.random.set_rng_state(generator_state)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.eval().requires_grad_(False)
