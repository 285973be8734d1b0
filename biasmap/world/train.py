"""Train the planted world's model: a KL-VAE, a tiny CLIP, then a text-conditioned UNet.

    python -m biasmap.world.train --out runs/planted            # the shipped model
    python -m biasmap.world.train --out runs/planted --export biasmap/world/weights

Three stages run in order, each from the world's renderer (fresh images every step):

1. `vae`: an `AutoencoderKL` (32 px images -> 4 x 16 x 16 latents), reconstruction MSE plus a
   small KL term; its latent scale (1 / std) is measured afterwards, as SD's 0.18215 was.
2. `clip`: a transformers `CLIPModel` (text and vision towers, the real CLIP tokenizer),
   contrastive on images and captions. A caption is a positive for every image whose
   labels it does not contradict ("... of a nurse" fits every nurse), so the targets are
   the normalised compatibility matrix rather than the identity.
3. `unet`: a `UNet2DConditionModel` with the standard diffusion objective (v-prediction,
   SD1.5's noise schedule), conditioned on the CLIP's frozen text tower, with 10% empty
   captions for classifier-free guidance and an EMA of the weights.

Nothing but the training data carries the bias. Every stage is seeded per step (the data
of step s depends only on the seed and s) and checkpoints atomically every
`--checkpoint-every` steps, so a killed run restarted with the same command resumes where
it stopped and gives the same weights. Losses go to `<out>/logs/<stage>.csv`; the command,
seed, versions and final losses to `<out>/training.json`. The final pipeline (a diffusers
folder) and CLIP (a transformers folder) are written in fp16 to `<out>/export` (or
`--export`).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..audit.clip import CLIP_MEAN, CLIP_STD
from .render import sample_batch
from .spec import AXES, IMAGE_SIZE, PROFESSIONS, caption, generator_caption

STAGES = ("vae", "clip", "unet")


@dataclass(frozen=True)
class Budget:
    """Steps, batch sizes and model widths of one training run."""

    vae_steps: int = 800
    vae_batch: int = 32
    clip_steps: int = 1500
    clip_batch: int = 128
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_channels: tuple[int, int] = (32, 64)
    text_width: int = 48
    lr_unet: float = 1e-3
    unet_weight_decay: float = 0.0
    checkpoint_every: int = 200


BUDGETS = {
    "full": Budget(),
    # A few steps of everything at small widths: the trainer's end-to-end test.
    "smoke": Budget(
        vae_steps=3,
        vae_batch=8,
        clip_steps=3,
        clip_batch=8,
        unet_steps=4,
        unet_batch=4,
        unet_channels=(8, 16),
        text_width=16,
        checkpoint_every=2,
    ),
}


# --------------------------------------------------------------------------- models


def build_vae():
    from ..models import _kl_vae

    # Two levels: 32 px images -> 16x16 latents. Self-attention at 16x16 would double the
    # VAE's cost for flat-colour images.
    return _kl_vae((32, 64), 1, IMAGE_SIZE, norm_num_groups=8, mid_block_attention=False)


def build_clip(text_width: int):
    from transformers import CLIPModel

    from ..audit.clip import clip_config

    config = clip_config(
        text_width=text_width,
        text_layers=3,
        text_mlp=4 * text_width,
        vision_width=64,
        vision_layers=3,
        vision_mlp=128,
        image_size=IMAGE_SIZE,
        patch_size=4,
        projection_dim=32,
    )
    return CLIPModel(config)


def unet_config(channels: tuple[int, int], text_width: int) -> dict:
    """`UNet2DConditionModel` arguments of the shipped design."""
    return {
        "sample_size": IMAGE_SIZE // 2,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 2,
        "up_block_types": ("CrossAttnUpBlock2D",) * 2,
        "block_out_channels": tuple(channels),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": text_width,
        "attention_head_dim": 4,  # the head count, under diffusers' legacy SD1 name
    }


def build_unet(channels: tuple[int, int], text_width: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(channels, text_width))


def noise_schedule_config() -> dict:
    """SD1.5's scaled-linear schedule with v-prediction (DESIGN.md section 3: epsilon
    prediction did not learn this world in the CPU budget, v-prediction did)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "clip_sample": False,
    }


def text_tower(clip):
    """The CLIP's text tower as a standalone `CLIPTextModel` (what the pipeline conditions on)."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattened CLIPTextModel (no .text_model); earlier versions nest it.
    getattr(model, "text_model", model).load_state_dict(clip.text_model.state_dict())
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- data


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_clip_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> CLIP-normalised float32 [N, 3, H, W]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def step_rng(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Data and noise generators of one training step: a pure function of (seed, stage, step),
    so a resumed run draws exactly what the uninterrupted one would."""
    key = [seed, STAGES.index(stage), step]
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
    return np.random.default_rng(key), generator


# Caption forms for CLIP: which axes a caption names, and whether it names the profession.
CLIP_FORMS = (
    (True, ()),
    (True, ("gender",)),
    (True, ("race",)),
    (True, ("gender", "race")),
    (False, ("gender",)),
    (False, ("race",)),
)
# Caption forms for the UNet with their probabilities; None is the empty caption that
# teaches the unconditional prediction for classifier-free guidance.
# Each annotated caption names one axis only, so an axis's class is carried by its class word
# and its axis word alone (a later "race" token never also carries the gender class).
UNET_FORMS = ((None, 0.1), ((), 0.3), (("gender",), 0.3), (("race",), 0.3))
# Share of training captions whose end-of-text and padding states are replaced by the empty
# caption's. The causal text encoder's end-of-text state summarises the whole caption (the CLIP
# was trained to make it so); when it is always informative the UNet reads everything from it
# and its cross-attention need not look at the word that names a thing, which leaves the
# attribution maps of all words alike (measured on a run without this: no profession map
# peaked in its item more often than the others). Hiding the summary in most captions makes
# the words themselves the place to read from, as in captioned real-world data.
SUMMARY_DROPOUT = 0.7


def clip_captions(batch, rng: np.random.Generator) -> tuple[list[str], list[dict]]:
    """One caption per image and the labels each caption names (for the compatibility)."""
    captions, named = [], []
    for i, profession in enumerate(batch.professions):
        with_profession, axes = CLIP_FORMS[rng.integers(len(CLIP_FORMS))]
        labels = {"gender": batch.genders[i], "race": batch.races[i]}
        classes = {axis: labels[axis] for axis in axes}
        captions.append(caption(profession if with_profession else None, classes))
        named.append({**classes, **({"profession": profession} if with_profession else {})})
    return captions, named


def compatibility(batch, named: list[dict]) -> torch.Tensor:
    """[N_images, N_captions] 1 where caption j does not contradict image i's labels."""
    rows = []
    for i, profession in enumerate(batch.professions):
        labels = {"profession": profession, "gender": batch.genders[i], "race": batch.races[i]}
        rows.append([all(labels[k] == v for k, v in n.items()) for n in named])
    return torch.tensor(rows, dtype=torch.float32)


def unet_caption_set(caption_of=generator_caption) -> list[str]:
    """Every caption the UNet sees: "" and each profession alone or with one axis's class code."""
    captions = [""]
    for profession in PROFESSIONS:
        captions.append(caption_of(profession))
        for axis, classes in AXES.items():
            captions.extend(caption_of(profession, axis, c) for c in classes)
    return captions


def unet_captions(
    batch, rng: np.random.Generator, forms=UNET_FORMS, caption_of=generator_caption
) -> list[str]:
    forms, weights = zip(*forms, strict=True)
    picks = rng.choice(len(forms), size=len(batch.professions), p=weights)
    captions = []
    for i, pick in enumerate(picks):
        axes = forms[pick]
        if axes is None:
            captions.append("")
            continue
        labels = {"gender": batch.genders[i], "race": batch.races[i]}
        axis = axes[0] if axes else None
        captions.append(caption_of(batch.professions[i], axis, labels[axis] if axis else None))
    return captions


# --------------------------------------------------------------------------- checkpoints


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp name, fsync, rename: a kill never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(temp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


class Log:
    """Append-only CSV of (step, losses...), cut back to the checkpoint's step on resume."""

    def __init__(self, path: Path, fields: list[str], resume_step: int):
        self.path, self.fields = path, ["step", *fields, "seconds"]
        rows = []
        if path.is_file() and resume_step > 0:
            with open(path) as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) < resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.fields)
            writer.writeheader()
            writer.writerows(rows)
        self.rows = rows

    def write(self, step: int, seconds: float, **losses: float) -> None:
        row = {"step": step, **{k: f"{v:.6g}" for k, v in losses.items()}}
        row["seconds"] = f"{seconds:.3f}"
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.fields).writerow(row)
        self.rows.append(row)


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def run_stage(
    stage,
    out: Path,
    steps: int,
    every: int,
    model,
    optimizer,
    step_fn,
    fields,
    *,
    peak_lr: float,
    ema=None,
) -> dict:
    """The shared loop: resume from `<out>/checkpoints/<stage>.pt`, run `step_fn(step)` ->
    losses until `steps`, checkpoint every `every` steps and at the end."""
    checkpoint = out / "checkpoints" / f"{stage}.pt"
    start = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]
        print(f"[{stage}] resuming at step {start}/{steps}", flush=True)
    log = Log(out / "logs" / f"{stage}.csv", fields, start)
    last = {}
    for step in range(start, steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        last = step_fn(step)
        if ema is not None:
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 1.0 - decay)
        log.write(step, time.perf_counter() - began, **last)
        done = step + 1
        if done % every == 0 or done == steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done}
            if ema is not None:
                state["ema"] = ema.state_dict()
            atomic_save(state, checkpoint)
        if done % 50 == 0 or done == steps:
            summary = " ".join(f"{k}={v:.4f}" for k, v in last.items())
            print(f"[{stage}] step {done}/{steps} {summary}", flush=True)
    if not last and log.rows:
        last = {k: float(v) for k, v in log.rows[-1].items() if k not in ("step", "seconds")}
    return last


# --------------------------------------------------------------------------- stages


def train_vae(out: Path, budget: Budget, seed: int, device: torch.device):
    torch.manual_seed(seed)
    vae = build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def step(s: int) -> dict:
        rng, generator = step_rng(seed, "vae", s)
        x = to_unit_range(sample_batch(budget.vae_batch, rng).images).to(device)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        z = posterior.mean + posterior.std * noise
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = mse + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"mse": mse.item(), "kl": kl.item()}

    final = run_stage(
        "vae",
        out,
        budget.vae_steps,
        budget.checkpoint_every,
        vae,
        optimizer,
        step,
        ["mse", "kl"],
        peak_lr=1e-3,
    )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        rng, generator = step_rng(seed, "vae", budget.vae_steps)
        x = to_unit_range(sample_batch(256, rng).images).to(device)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents = posterior.mean + posterior.std * noise
        scale = 1.0 / latents.std().item()
        psnr = (10 * torch.log10(4.0 / F.mse_loss(vae.decode(latents).sample, x))).item()
    vae.register_to_config(scaling_factor=scale)
    return vae, {**final, "scaling_factor": scale, "psnr_db": psnr}


def train_clip(out: Path, budget: Budget, seed: int, device: torch.device):
    from ..models import clip_tokenizer

    torch.manual_seed(seed + 1)
    clip = build_clip(budget.text_width).to(device)
    tokenizer = clip_tokenizer()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=5e-4, weight_decay=0.01)

    def step(s: int) -> dict:
        rng, _ = step_rng(seed, "clip", s)
        batch = sample_batch(budget.clip_batch, rng)
        captions, named = clip_captions(batch, rng)
        target = compatibility(batch, named).to(device)
        tokens = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items()}
        image = F.normalize(
            clip.get_image_features(
                pixel_values=to_clip_pixels(batch.images).to(device)
            ).pooler_output,
            dim=-1,
        )
        text = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
        logits = clip.logit_scale.clamp(max=math.log(100.0)).exp() * image @ text.T
        loss_images = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1)
        loss_texts = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0)
        loss = (loss_images.mean() + loss_texts.mean()) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "scale": clip.logit_scale.exp().item()}

    final = run_stage(
        "clip",
        out,
        budget.clip_steps,
        budget.checkpoint_every,
        clip,
        optimizer,
        step,
        ["loss", "scale"],
        peak_lr=5e-4,
    )
    clip.eval().requires_grad_(False)
    return clip.cpu(), {**final, **zero_shot_accuracy(clip.cpu(), tokenizer, seed)}


@torch.no_grad()
def zero_shot_accuracy(clip, tokenizer, seed: int, n: int = 512) -> dict:
    """Zero-shot accuracy on fresh world images, per axis with the audit's class prompts and
    for the profession with the generation prompt."""
    rng = np.random.default_rng([seed, 99])
    batch = sample_batch(n, rng)
    image = F.normalize(
        clip.get_image_features(pixel_values=to_clip_pixels(batch.images)).pooler_output, dim=-1
    )
    truths = {"gender": batch.genders, "race": batch.races, "profession": batch.professions}
    classes = {**AXES, "profession": PROFESSIONS}
    accuracy = {}
    for name, labels in truths.items():
        prompts = [
            caption(c, {}) if name == "profession" else caption(None, {name: c})
            for c in classes[name]
        ]
        tokens = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
        text = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
        predicted = (image @ text.T).argmax(1)
        hits = [classes[name][int(p)] == label for p, label in zip(predicted, labels, strict=True)]
        accuracy[f"zero_shot_{name}"] = float(np.mean(hits))
    return accuracy


def train_unet(
    out: Path,
    budget: Budget,
    seed: int,
    vae,
    text_encoder,
    device: torch.device,
    *,
    unet_factory=build_unet,
    forms=UNET_FORMS,
    caption_of=generator_caption,
    sample=None,
):
    """The UNet stage. `unet_factory(channels, text_width)` (called after seeding), `forms`
    (caption forms and their probabilities), `caption_of(profession, axis, class)` and
    `sample(n, rng)` (the training images and labels; default `render.sample_batch`, looked up
    when each step runs) are open so that bench/planted_ablations.py can train variants of the
    shipped design."""
    from diffusers import DDPMScheduler

    from ..models import clip_tokenizer

    torch.manual_seed(seed + 2)
    unet = unet_factory(budget.unet_channels, budget.text_width).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(**noise_schedule_config())
    tokenizer = clip_tokenizer()
    captions = unet_caption_set(caption_of)
    with torch.no_grad():
        tokens = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt")
        embeddings = text_encoder(tokens.input_ids)[0].to(device)
        # [C, 77, D]: each caption's states, with its end-of-text and padding positions taken
        # from the empty caption (which holds no information there).
        lengths = tokens.attention_mask.sum(1)  # BOS ... EOS
        after_text = torch.arange(77)[None, :] >= (lengths - 1)[:, None]
        hidden = torch.where(after_text[..., None].to(device), embeddings[0:1], embeddings)
    index = {c: i for i, c in enumerate(captions)}
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=budget.lr_unet, weight_decay=budget.unet_weight_decay
    )
    scale = vae.config.scaling_factor

    def step(s: int) -> dict:
        rng, generator = step_rng(seed, "unet", s)
        batch = (sample or sample_batch)(budget.unet_batch, rng)
        rows = torch.tensor([index[c] for c in unet_captions(batch, rng, forms, caption_of)])
        hide = torch.from_numpy(rng.random(len(rows)) < SUMMARY_DROPOUT)[:, None, None]
        condition = torch.where(hide.to(device), hidden[rows], embeddings[rows])
        with torch.no_grad():
            posterior = vae.encode(to_unit_range(batch.images).to(device)).latent_dist
            draw = torch.randn(posterior.mean.shape, generator=generator).to(device)
            latents = (posterior.mean + posterior.std * draw) * scale
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, 1000, (len(latents),), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=condition).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item()}

    final = run_stage(
        "unet",
        out,
        budget.unet_steps,
        budget.checkpoint_every,
        unet,
        optimizer,
        step,
        ["loss"],
        peak_lr=budget.lr_unet,
        ema=ema,
    )
    return ema.eval(), final


# --------------------------------------------------------------------------- export


def export(folder: Path, vae, clip, unet) -> None:
    """Write the pipeline (diffusers folder) and the CLIP (transformers folder) in fp16."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..models import clip_tokenizer

    schedule = noise_schedule_config()
    scheduler = DDIMScheduler(**schedule, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae),
        text_encoder=text_tower(clip),
        tokenizer=clip_tokenizer(),
        unet=copy.deepcopy(unet),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    clip_folder = folder / "clip"
    copy.deepcopy(clip).to(torch.float16).save_pretrained(clip_folder, safe_serialization=True)
    preprocessor = {
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }
    (clip_folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))


def step_seconds(out: Path, stage: str) -> float:
    """Wall seconds of a stage's training steps, summed over every invocation (resumes too)."""
    with open(out / "logs" / f"{stage}.csv") as handle:
        return round(sum(float(row["seconds"]) for row in csv.DictReader(handle)), 1)


def plot_losses(out: Path) -> Path:
    """`<out>/losses.png`: every stage's loss curves from `<out>/logs/*.csv` (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(STAGES), figsize=(4 * len(STAGES), 3))
    for axis, stage in zip(axes, STAGES, strict=True):
        with open(out / "logs" / f"{stage}.csv") as handle:
            rows = list(csv.DictReader(handle))
        steps = np.array([int(r["step"]) for r in rows])
        for name in [k for k in rows[0] if k not in ("step", "seconds", "scale", "kl")]:
            values = np.array([float(r[name]) for r in rows])
            window = max(1, len(values) // 100)  # a moving average keeps the trend readable
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1 :], smooth, label=name)
        axis.set(title=stage, xlabel="step", yscale="log")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = out / "losses.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def versions() -> dict:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m biasmap.world.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="run folder (resumable)")
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="where the fp16 pipeline/ and clip/ go (default <out>/export)",
    )
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the budget's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when there is one); data and noise are drawn on the "
        "CPU either way, so only floating-point rounding differs",
    )
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    if args.unet_steps is not None:
        if args.unet_steps < 1:
            parser.error(f"--unet-steps must be at least 1, got {args.unet_steps}")
        budget = Budget(**{**asdict(budget), "unet_steps": args.unet_steps})
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    device = torch.device(args.device)
    vae, vae_summary = train_vae(out, budget, args.seed, device)
    clip, clip_summary = train_clip(out, budget, args.seed, device)
    print(f"[clip] {clip_summary}", flush=True)
    unet, unet_summary = train_unet(out, budget, args.seed, vae, text_tower(clip), device)
    vae, unet = vae.cpu(), unet.cpu()
    folder = args.export or out / "export"
    export(folder, vae, clip, unet)
    record = {
        "command": "python -m biasmap.world.train "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "budget": asdict(budget),
        "versions": versions(),
        "final": {"vae": vae_summary, "clip": clip_summary, "unet": unet_summary},
        "seconds_this_invocation": round(time.time() - began, 1),
        "step_seconds_per_stage": {stage: step_seconds(out, stage) for stage in STAGES},
        "noise_schedule": noise_schedule_config(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    plot_losses(out)
    (folder / "training.json").write_text(json.dumps(record, indent=2))
    print(f"exported to {folder}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
