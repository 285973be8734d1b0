"""Which training choices make the planted model's attribution maps localize?

    PYTHONPATH=. python bench/planted_ablations.py --run runs/planted --steps 1500 --seeds 8

The shipped planted model's maps are nearly flat (README, "Ground truth"), so its mIoU does not
follow the planted entanglement. Each variant below changes one thing in the UNet stage of
`biasmap.world.train` and trains only that stage (`--steps` steps, one thread, the trainer's
seeded data), on the VAE and CLIP checkpoints of a finished training run (`--run`, made by
`python -m biasmap.world.train --out runs/planted`). Every variant, the shipped design
included, then gets the validation's own measurements (`biasmap.world.validation.localization`,
20 DDIM steps): map contrast (1 = flat), how often each map peaks inside its true cue, and the
Spearman correlation of mIoU with the planted entanglement per axis.

Variants run two at a time (`--jobs`), each in its own process, and resume: a variant whose
`result.json` exists is read back, and a killed training resumes from its checkpoint.
Results: `bench/results/planted_ablations.md`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"

# One change each from the shipped design (heads 4, its caption mix, default initialisation,
# the CLIP's full text tower, the KL-VAE's latents, the skewed classes, two UNet levels).
AXIS_HEAVY_FORMS = ((None, 0.1), ((), 0.1), (("gender",), 0.4), (("race",), 0.4))
AXIS_ONLY_FORMS = ((None, 0.1), (("gender",), 0.45), (("race",), 0.45))
VARIANTS = {
    "shipped design": {},
    "1 attention head": {"heads": 1},
    "1 head + 80% axis captions": {"heads": 1, "forms": "axis-heavy"},
    "q/k init x3": {"qk_init": 3.0},
    "q/k init x6": {"qk_init": 6.0},
    "random frozen text encoder": {"text": "random"},
    "text encoder's first layer": {"text": "first-layer"},
    "pixel space (2x2-pooled RGB; no VAE)": {"pixel": True},
    "weight decay 0.1": {"weight_decay": 0.1},
    "weight decay 1.0": {"weight_decay": 1.0},
    "prototype captions (class names; axis word after)": {"captions": "prototype"},
    "CLIP token embeddings (no text layers)": {"text": "embeddings"},
    "CLIP token embeddings without positions": {"text": "embeddings-no-position"},
    # Not a fix (the skew is what RD must find) but a test of why the maps spread: with skewed
    # classes the hair and face must read the profession word to draw their class.
    "no skew (uniform classes for every profession)": {"classes": "uniform"},
    "no skew + 90% axis captions": {"classes": "uniform", "forms": "axis-only"},
    # Deeper UNets: SD's maps localize best one level above its lowest.
    "3 levels (channels 32 64 64)": {"levels": "attention-everywhere"},
    "3 levels with SD's layout (no attention at the lowest)": {"levels": "sd"},
}


def prototype_caption(profession: str, axis: str | None = None, cls: str | None = None) -> str:
    """DESIGN.md's prototype caption form with the class names: "A photo of the face of a female
    nurse, gender female" (the shipped design codes the class: "... nurse and second gender")."""
    if axis is None:
        return f"A photo of the face of a {profession}"
    return f"A photo of the face of a {cls} {profession}, {axis} {cls}"


def uniform_batch(n: int, rng):
    """N portraits like `render.sample_batch`, but with every class equally likely for every
    profession (the world without its skew)."""
    from biasmap.world.render import Batch, render_batch
    from biasmap.world.spec import AXES, PROFESSIONS

    professions = [PROFESSIONS[i] for i in rng.integers(0, len(PROFESSIONS), n)]
    genders, races = (
        [classes[i] for i in rng.integers(0, len(classes), n)] for classes in AXES.values()
    )
    return Batch(render_batch(professions, genders, races, rng), professions, genders, races)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def pixel_vae():
    """A stand-in 'VAE' whose latents are the 2x2-pooled RGB image (3 x 16 x 16) and whose
    decoder is a nearest upsample: DESIGN.md's prototype trained on pixels directly."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    class Pooled:
        def __init__(self, mean):
            self.mean, self.std = mean, mean.new_zeros(mean.shape)

        def sample(self, generator=None):
            return self.mean

        def mode(self):
            return self.mean

    class PixelVAE(AutoencoderKL):
        def encode(self, x, return_dict=True):
            return AutoencoderKLOutput(latent_dist=Pooled(F.avg_pool2d(x, 2)))

        def decode(self, z, return_dict=True, generator=None):
            x = F.interpolate(z, scale_factor=2, mode="nearest")
            return DecoderOutput(sample=x) if return_dict else (x,)

    vae = PixelVAE(
        down_block_types=("DownEncoderBlock2D",) * 2,  # two levels: the pipeline's factor 2
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=8,
        sample_size=32,
    )
    vae.register_to_config(scaling_factor=1.0)
    return vae.eval().requires_grad_(False)


def _text_variant(train, clip, kind: str | None):
    """(the frozen text tower the UNet conditions on, the CLIP exported with the pipeline)."""
    import copy

    import torch
    from transformers import CLIPTextModel

    clip = copy.deepcopy(clip)
    config = clip.config.text_config
    if kind == "random":
        torch.manual_seed(123)
        fresh = CLIPTextModel(config)
        clip.text_model.load_state_dict(getattr(fresh, "text_model", fresh).state_dict())
    elif kind == "first-layer":  # the trained tower's first layer and final layer norm
        config.num_hidden_layers = 1
        del clip.text_model.encoder.layers[1:]
    elif kind in ("embeddings", "embeddings-no-position"):
        # The trained token (and position) embeddings and the final layer norm, with no layer
        # between: each word's state is the word itself, not its context.
        config.num_hidden_layers = 0
        del clip.text_model.encoder.layers[:]
        if kind == "embeddings-no-position":
            with torch.no_grad():
                clip.text_model.embeddings.position_embedding.weight.zero_()
    elif kind is not None:
        raise ValueError(f"unknown text variant {kind!r}")
    return train.text_tower(clip), clip


def run_variant(name: str, run: Path, work: Path, steps: int, seeds: int) -> dict:
    """Train one variant's UNet and measure its maps; cached in `<work>/<slug>/result.json`."""
    from dataclasses import replace

    import torch

    torch.set_num_threads(1)
    import biasmap.world.train as train
    from biasmap.world.spec import AXES, PROFESSIONS
    from biasmap.world.validation import figures_without_curves, localization

    options = VARIANTS[name]
    out = work / slug(name)
    result_path = out / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    for stage in ("vae", "clip"):
        if not (out / "checkpoints" / f"{stage}.pt").is_file():
            shutil.copy(run / "checkpoints" / f"{stage}.pt", out / "checkpoints" / f"{stage}.pt")
    budget = replace(
        train.BUDGETS["full"],
        unet_steps=steps,
        unet_weight_decay=options.get("weight_decay", 0.0),
    )
    device = torch.device("cpu")
    began = time.time()
    vae, _ = train.train_vae(out, budget, 0, device)
    full_clip, _ = train.train_clip(out, budget, 0, device)
    tower, clip = _text_variant(train, full_clip, options.get("text"))
    if options.get("pixel"):
        vae = pixel_vae()

    def unet_factory(channels, text_width):
        from diffusers import UNet2DConditionModel

        config = train.unet_config(channels, text_width)
        if "heads" in options:
            config["attention_head_dim"] = options["heads"]
        if options.get("pixel"):
            config["in_channels"] = config["out_channels"] = 3
        if "levels" in options:
            config["block_out_channels"] = (*channels, channels[-1])
            attention = ("CrossAttn", "CrossAttn", "CrossAttn" if options["levels"] != "sd" else "")
            config["down_block_types"] = tuple(f"{a}DownBlock2D" for a in attention)
            config["up_block_types"] = tuple(f"{a}UpBlock2D" for a in reversed(attention))
        unet = UNet2DConditionModel(**config)
        if "qk_init" in options:
            with torch.no_grad():
                for module_name, module in unet.named_modules():
                    if module_name.endswith("attn2"):  # cross-attention only
                        module.to_q.weight.mul_(options["qk_init"])
                        module.to_k.weight.mul_(options["qk_init"])
        return unet

    forms = {"axis-heavy": AXIS_HEAVY_FORMS, "axis-only": AXIS_ONLY_FORMS}.get(
        options.get("forms"), train.UNET_FORMS
    )
    prototype = options.get("captions") == "prototype"
    unet, final = train.train_unet(
        out,
        budget,
        0,
        vae,
        tower,
        device,
        unet_factory=unet_factory,
        forms=forms,
        caption_of=prototype_caption if prototype else train.generator_caption,
        sample=uniform_batch if options.get("classes") == "uniform" else None,
    )
    pipe = _pipeline(train, vae, clip, unet.cpu(), out, pixel=bool(options.get("pixel")))
    figures = localization(pipe, PROFESSIONS, list(AXES), list(range(seeds)), 20)
    result = {
        "variant": name,
        "options": dict(options),
        "steps": steps,
        "seeds": seeds,
        "final_loss": final.get("loss"),
        "seconds": round(time.time() - began, 1),
        "figures": figures_without_curves(figures),
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


def _pipeline(train, vae, clip, unet, out: Path, *, pixel: bool):
    """The variant as the shipped model would be: exported in fp16 and loaded back (the pixel
    variant's stand-in VAE cannot be saved, so it is rebuilt around the loaded pipeline)."""
    import torch

    from biasmap.models import load_pipeline

    folder = out / "export"
    if not (folder / "pipeline" / "model_index.json").is_file():
        train.export(folder, train.build_vae() if pixel else vae, clip, unet)
    pipe = load_pipeline(str(folder / "pipeline"))
    if pixel:
        pipe.register_modules(vae=pixel_vae())
    return pipe.to(torch.float32)


class _CrossAttentionRecorder:
    """Wraps a module's attention processor (`inner`, which still computes the output) and
    keeps each cross-attention call's probabilities [batch * heads, pixels, tokens]."""

    def __init__(self, name: str, calls: list, inner):
        self.name, self.calls, self.inner = name, calls, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if encoder_hidden_states is not None:
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probabilities = attn.get_attention_scores(query, key, None)
            self.calls.append((self.name, attn.heads, probabilities.detach()))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)


def per_head_contrast(pipe, seeds: int = 2, steps: int = 20) -> dict:
    """Contrast of each cross-attention head of the model, averaged over the last half of the
    steps, the 8 professions and `seeds` seeds, for the training-form prompt ("A photo of the
    face of a nurse and second gender", in-prompt keys): "gender" in the hair and the
    profession word in its item. Returns {"gender": {block: [per head]}, "profession": ...}."""
    import numpy as np
    import torch

    from biasmap.discovery.tokens import concept_positions
    from biasmap.world.render import cue_masks
    from biasmap.world.spec import PROFESSIONS, generator_caption
    from biasmap.world.validation import truth_at

    calls: list = []
    original = dict(pipe.unet.attn_processors)

    def block_of(name: str) -> str:  # "up_blocks.0.attentions.0...attn2.processor" -> "up_blocks.0"
        return name.split(".attentions")[0].split(".attn")[0]

    pipe.unet.set_attn_processor(
        {
            name: _CrossAttentionRecorder(block_of(name), calls, processor)
            for name, processor in original.items()
        }
    )
    sums: dict = {"gender": {}, "profession": {}}
    for profession in PROFESSIONS:
        prompt = generator_caption(profession, "gender", "female")
        tokens = concept_positions(pipe.tokenizer, prompt, ["gender", profession])
        length = tokens.num_real_tokens
        positions = {"gender": tokens.positions[0][0], "profession": tokens.positions[1][0]}
        calls.clear()
        pipe(
            prompt,
            num_inference_steps=steps,
            num_images_per_prompt=seeds,
            generator=[torch.Generator().manual_seed(s) for s in range(seeds)],
            output_type="np",
        )
        late = calls[len(calls) // 2 :]
        truth = cue_masks(profession)
        for name, heads, probabilities in late:
            conditional = probabilities[seeds * heads :, :, :length]  # [seeds*heads, HW, L]
            conditional = conditional / conditional.sum(-1, keepdim=True)
            side = int(conditional.shape[1] ** 0.5)
            for concept, region in (("gender", truth["gender"]), ("profession", truth["item"])):
                inside = truth_at(region, side).flatten()
                column = conditional[..., positions[concept]].reshape(seeds, heads, -1)
                share = column[..., inside].sum(-1) / column.sum(-1) / inside.float().mean()
                entry = sums[concept].setdefault(name, [])
                entry.append(share.mean(0).numpy())
    pipe.unet.set_attn_processor(original)
    return {
        concept: {
            block: [round(float(v), 2) for v in np.mean(values, axis=0)]
            for block, values in per.items()
        }
        for concept, per in sums.items()
    }


WORD_STATE_PAIRS = (
    # (label, (prompt, word), (prompt, word))
    (
        '"gender" and "race" after the same prefix',
        ("A photo of the face of a nurse and second gender", "gender"),
        ("A photo of the face of a nurse and second race", "race"),
    ),
    (
        '"gender" in the training caption and in the attribution prompt',
        ("A photo of the face of a nurse and second gender", "gender"),
        ("A photo of the face of a nurse and gender", "gender"),
    ),
    (
        '"gender" in the attribution prompt and alone',
        ("A photo of the face of a nurse and gender", "gender"),
        ("gender", "gender"),
    ),
)


def word_state_cosines(pipe) -> dict[str, float]:
    """Cosine similarity of the pipeline text encoder's states [D] of a word in two prompts,
    for each pair of WORD_STATE_PAIRS: whether a state says which word it is or where it is."""
    import torch

    from biasmap.discovery.tokens import concept_positions

    def state(prompt: str, word: str):
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt")
        ((index,),) = concept_positions(pipe.tokenizer, prompt, [word]).positions
        with torch.no_grad():
            return pipe.text_encoder(ids.input_ids)[0][0, index].float()

    return {
        label: float(torch.nn.functional.cosine_similarity(state(*a), state(*b), dim=0))
        for label, a, b in WORD_STATE_PAIRS
    }


def _summary(result: dict) -> dict:
    """{axis: Spearman of mIoU with the planted entanglement, and mean contrasts and peaks}."""
    import numpy as np
    from scipy.stats import spearmanr

    from biasmap.world.spec import SPEC

    rows = {}
    for axis, per in result["figures"].items():
        entanglement = [SPEC[p]["entanglement"][axis] for p in per]
        column = {key: [r[key] for r in per.values()] for key in next(iter(per.values()))}
        rows[axis] = {
            "spearman": float(spearmanr(column["miou"], entanglement)[0]),
            "axis_contrast": float(np.mean(column["axis_contrast"])),
            "axis_peak": float(np.mean(column["axis_peak_in_region"])),
            "profession_contrast": float(np.mean(column["profession_contrast"])),
            "profession_peak": float(np.mean(column["profession_peak_in_item"])),
        }
    return rows


def _markdown(
    results: list[dict], heads: dict, states: dict, command: str, steps: int, seeds: int
) -> str:
    lines = [
        "# Planted world: UNet-stage ablations",
        "",
        f"Command: `{command}`. Each variant trains the UNet stage only, "
        f"{steps} steps on one thread, on the VAE and CLIP of the shipped "
        f"training run; maps from {seeds} seeds per profession and axis, "
        "20 DDIM steps. Contrast = a map's share of attribution inside its true cue / the "
        "cue's share of the map (1 = flat); peak = share of seeds whose map peaks inside "
        "the cue; Spearman = mIoU against the planted entanglement over the 8 professions "
        "(target >= 0.8).",
        "",
        "| variant | axis | Spearman mIoU vs entanglement | axis-word contrast | "
        "axis-word peak in cue | profession contrast | profession peak in item |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for axis, row in _summary(result).items():
            lines.append(
                f"| {result['variant']} | {axis} | {row['spearman']:.2f} | "
                f"{row['axis_contrast']:.2f} | {row['axis_peak']:.2f} | "
                f"{row['profession_contrast']:.2f} | {row['profession_peak']:.2f} |"
            )
    lines += [
        "",
        "## Per-head contrast of the shipped model",
        "",
        'Cross-attention heads of `load_pipeline("planted")`, in-prompt keys of the training-'
        'form prompt ("A photo of the face of a nurse and second gender"), last 10 of 20 '
        "steps, 8 professions x 2 seeds. The maps average the heads, as the paper and DAAM do.",
        "",
        '| block | "gender" in the hair, per head | profession word in its item, per head |',
        "|---|---|---|",
    ]
    for block in heads["gender"]:
        lines.append(
            f"| {block} | {' / '.join(f'{v:.2f}' for v in heads['gender'][block])} | "
            f"{' / '.join(f'{v:.2f}' for v in heads['profession'][block])} |"
        )
    lines += [
        "",
        "## Word states of the shipped text tower",
        "",
        "Cosine similarity of the pipeline's text-encoder states (what the UNet's keys are made "
        "from) of one word in two prompts:",
        "",
        "| states | cosine |",
        "|---|---|",
        *(f"| {label} | {value:.2f} |" for label, value in states.items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "planted")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", default="all", help="comma-separated names, or all")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "planted-ablations")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    for stage in ("vae", "clip"):
        if not (args.run / "checkpoints" / f"{stage}.pt").is_file():
            parser.error(
                f"{args.run} has no {stage} checkpoint; train it first with "
                f"python -m biasmap.world.train --out {args.run}"
            )
    jobs = [(n, args.run, args.work_dir, args.steps, args.seeds) for n in names]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.starmap(run_variant, jobs)
    import torch

    from biasmap.models import load_pipeline
    from biasmap.world.spec import AXES, PROFESSIONS
    from biasmap.world.validation import figures_without_curves, localization

    torch.set_num_threads(1)
    shipped = load_pipeline("planted")
    reference = localization(shipped, PROFESSIONS, list(AXES), list(range(args.seeds)), 20)
    results.insert(
        0,
        {
            "variant": "shipped model (4000 steps, for reference)",
            "figures": figures_without_curves(reference),
        },
    )
    heads = per_head_contrast(shipped)
    states = word_state_cosines(shipped)
    command = " ".join(
        [
            "PYTHONPATH=. python bench/planted_ablations.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    text = _markdown(results, heads, states, command, args.steps, args.seeds)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "planted_ablations.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
