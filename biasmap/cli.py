"""The `biasmap` command line."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    help="BiasMap: discover and mitigate social bias in Stable Diffusion through "
    "cross-attention attribution maps.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def info() -> None:
    """Print, for every op, which backends are available here and why each missing one is not."""
    from biasmap.info import backend_report

    typer.echo(backend_report())


@app.command()
def maps(
    concepts: Annotated[
        list[str],
        typer.Option(
            help="Concepts: the demographic concept, then the profession (e.g. --concepts gender "
            "firefighter). Words of P'; a comma-separated list also works.",
        ),
    ],
    prompt: str = typer.Option(
        ..., help="Generation prompt P, e.g. 'A photo of the face of a firefighter'."
    ),
    attribution: str = typer.Option(
        ..., help="Attribution prompt P' holding the concepts, e.g. '... firefighter and gender'."
    ),
    more_concepts: Annotated[list[str] | None, typer.Argument(hidden=True)] = None,
    model: str = typer.Option(
        "planted",
        help="planted (the trained planted-world model shipped with biasmap), tiny, tiny-sd2, "
        "tiny-sdxl, random-sd15 (random weights), a local folder or a hub id.",
    ),
    seed: int = typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    num_images: int = typer.Option(1, "--num-images", min=1, help="Images to generate."),
    steps: int = typer.Option(50, min=1, help="Sampler steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale (<= 1: none)."),
    q: float = typer.Option(0.7, min=0.0, max=1.0, help="Mask quantile for IoU / BIoU."),
    cfg_half: str = typer.Option(
        "cond", help="CFG half whose queries give the maps: cond or uncond."
    ),
    softmax_over: str = typer.Option(
        "prompt", help="Softmax domain: prompt (real tokens) or padded (all 77)."
    ),
    height: int = typer.Option(None, help="Image height (default: the model's)."),
    width: int = typer.Option(None, help="Image width (default: the model's)."),
    device: str = typer.Option("cpu", help="torch device."),
    dtype: str = typer.Option("fp32", help="fp32, fp16 or bf16."),
    out: str = typer.Option(..., help="Output folder for PNGs and maps.json."),
) -> None:
    """Generate images, capture concept attribution maps, write overlays, BIoU charts and IoU JSON.

    Writes image_<i>.png, overlay_<i>.png (image, both heatmaps, masks, overlap and IoU, like
    the paper's Figure 3), biou_<i>.png (per-block BIoU, Figures 4-6) and maps.json.
    """
    import json
    from pathlib import Path

    import torch

    import biasmap
    from biasmap.models import load_pipeline

    # `--concepts gender firefighter`: click options take one value each, so the words after
    # the first arrive as extra arguments; commas also separate concepts.
    words = [w.strip() for item in [*concepts, *(more_concepts or [])] for w in item.split(",")]
    words = [w for w in words if w]
    if len(words) != 2:
        raise typer.BadParameter(
            f"give exactly two concepts (demographic, then profession), got {words}",
            param_hint="--concepts",
        )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model, dtype, device)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)]
    size = {key: value for key, value in (("height", height), ("width", width)) if value}
    with biasmap.trace(
        pipe, attribution, words, cfg_half=cfg_half, softmax_over=softmax_over
    ) as tr:
        images = pipe(
            prompt,
            num_images_per_prompt=num_images,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            **size,
        ).images
    attribution_maps = tr.maps().cpu()
    concept_a, concept_b = words
    for i, image in enumerate(images):
        image.save(folder / f"image_{i}.png")
        attribution_maps.plot(
            image, concept_a, concept_b, q, index=i, path=folder / f"overlay_{i}.png"
        )
        attribution_maps.plot_biou(concept_a, concept_b, q, index=i, path=folder / f"biou_{i}.png")
    if num_images > 1:
        attribution_maps.plot_biou(concept_a, concept_b, q, path=folder / "biou_mean.png")
    summary = attribution_maps.summary(concept_a, concept_b, q)
    summary.update(
        model=model,
        prompt=prompt,
        attribution=attribution,
        seeds=[seed + i for i in range(num_images)],
        steps=steps,
        guidance=guidance,
        cfg_half=cfg_half,
        softmax_over=softmax_over,
        map_size=list(attribution_maps.size),
        miou=sum(summary["iou"]) / len(summary["iou"]),
        mbiou=sum(summary["biou"]["mean"]) / len(summary["biou"]["mean"]),
    )
    (folder / "maps.json").write_text(json.dumps(summary, indent=2))
    typer.echo(
        f"IoU({concept_a}, {concept_b}) = {[round(v, 4) for v in summary['iou']]}; wrote {folder}"
    )


def _seed_range(text: str) -> list[int]:
    """ "0-3" -> [0, 1, 2, 3]; "0,5,7" and "4" also work."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            seeds.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise typer.BadParameter(
            f"seeds must look like 0-3, 4 or 0,5,7; got {text!r}", param_hint="--seeds"
        ) from None
    return seeds


@app.command()
def generate(
    profession: str = typer.Option(..., help="Profession word, e.g. firefighter."),
    axis: str = typer.Option("gender", help="Demographic axis: gender or race."),
    method: str = typer.Option(
        "biasmap",
        help="sd, biasmap, fd, fd+biasmap, hard, hard+biasmap, negative, negative+biasmap, "
        "or biasmap@down-64+up-64 (guidance on those blocks only).",
    ),
    seeds: str = typer.Option("0", help="Seeds: 0-3, 4 or 0,5,7."),
    lambda_: float = typer.Option(100.0, "--lambda", min=0.0, help="Energy guidance strength."),
    preset: str = typer.Option("paper", help="paper or official (the authors' code)."),
    model: str = typer.Option(
        "planted",
        help="planted (the trained planted-world model shipped with biasmap), tiny, "
        "random-sd15 (random weights), a local folder or a hub id.",
    ),
    steps: int = typer.Option(50, min=1, help="Sampler steps."),
    guidance: float = typer.Option(None, help="CFG scale (default: the preset's)."),
    q: float = typer.Option(0.7, min=0.0, max=1.0, help="Mask quantile."),
    device: str = typer.Option("cpu", help="torch device."),
    dtype: str = typer.Option("fp32", help="fp32, fp16 or bf16."),
    out: str = typer.Option(..., help="Output folder."),
) -> None:
    """Generate with a mitigation method; write images, overlays and per-step energies + IoU JSON.

    Per seed: image_<seed>.png, overlay_<seed>.png (image, heatmaps, masks, overlap, IoU) and
    an entry in result.json with the per-step SoftIoU energies and gradient norms and the
    final IoU / BIoU, measured on the run's own maps.
    """
    import json
    from pathlib import Path

    import torch

    from biasmap.mitigation import guided_generate
    from biasmap.mitigation.methods import plan
    from biasmap.models import load_pipeline

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model, dtype, device)
    results = []
    for seed in _seed_range(seeds):
        settings = plan(method, profession, axis, seed)
        output = guided_generate(
            pipe,
            settings.prompt,
            settings.attribution_prompt,
            settings.concepts,
            lambda_=lambda_ if settings.guided else 0.0,
            q=q,
            blocks=settings.blocks,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            negative_prompt=settings.negative_prompt,
            editing_prompt=settings.editing_prompt,
            preset=preset,
        )
        image = output.images[0]
        image.save(folder / f"image_{seed}.png")
        maps = output.maps.cpu()
        maps.plot(image, *settings.concepts, q, path=folder / f"overlay_{seed}.png")
        biou = output.biou()
        results.append(
            {
                "seed": seed,
                "prompt": settings.prompt,
                "attribution_prompt": settings.attribution_prompt,
                "energies": output.energies[:, 0].tolist(),
                "grad_norms": output.grad_norms[:, 0].tolist(),
                "guidance_applied": output.applied[:, 0].tolist(),
                "iou": float(output.iou()[0]),
                "biou": {name: float(values[0]) for name, values in biou.items()},
            }
        )
        typer.echo(f"seed {seed}: IoU = {results[-1]['iou']:.4f}")
    summary = {
        "model": model,
        "profession": profession,
        "axis": axis,
        "method": method,
        "lambda": lambda_,
        "preset": preset,
        "steps": steps,
        "q": q,
        "results": results,
    }
    (folder / "result.json").write_text(json.dumps(summary, indent=2))
    typer.echo(f"wrote {folder}")


@app.command(context_settings={"allow_interspersed_args": True})
def audit(
    config: str = typer.Option(..., "--config", help="Audit config YAML (see configs/demo.yaml)."),
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="key=value overrides applied to the config before validation; dotted keys "
            "reach into mappings, values are YAML: steps=5 seeds=0-9 'methods=[sd,fd]' "
            "axes.gender.concept=sex output=runs/x"
        ),
    ] = None,
    executor: str = typer.Option(None, help="local or ray (default: the config's, else local)."),
    workers: int = typer.Option(None, min=1, help="Ray workers (default: one per GPU, else 1)."),
    threads: int = typer.Option(None, min=1, help="torch threads per worker."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run or resume an audit grid (professions x axes x seeds x methods x lambdas).

    Every image becomes one row of the run folder's Parquet results store (output in the
    config). Rerunning the same command resumes: images already in the store are skipped,
    and corrupt part files are moved to parts/corrupt/ and their images regenerated. Ends
    with the run folder, and the HTML report's path when biasmap.report is installed.
    """
    from biasmap.audit.config import ConfigError, load_config
    from biasmap.audit.runner import RunFolderMismatchError, run_audit

    cli_values = {"executor": executor, "workers": workers, "threads": threads}
    extra = [f"{name}={value}" for name, value in cli_values.items() if value is not None]
    try:
        settings = load_config(config, [*(overrides or []), *extra])
    except ConfigError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    try:
        summary = run_audit(settings, progress=progress)
    except RunFolderMismatchError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    if summary.check.corrupt:
        typer.echo(summary.check.summary(), err=True)
    typer.echo(
        f"{summary.generated} image(s) generated, {summary.skipped} already present, "
        f"{summary.total} in the grid ({summary.seconds:.1f} s, "
        f"{summary.images_per_second:.2f} images/s)"
    )
    typer.echo(f"run folder: {summary.run_dir}")
    from biasmap.report import write_report

    typer.echo(f"report: {write_report(summary.run_dir)}")


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="Audit output folder (holds parts/*.parquet)."),
    fid_weights: str = typer.Option(
        None,
        help="FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth, a state dict "
        "or .safetensors); default: fid_weights in RUN_DIR/config.yaml. Without: FID is "
        "reported as unavailable.",
    ),
    device: str = typer.Option("cpu", help="torch device for FID features."),
    config_hash: str = typer.Option(
        None, help="Report only this config hash's rows (default: all, newest per image)."
    ),
) -> None:
    """Write RUN_DIR/report/index.html (the paper's tables, block charts, lambda trade-off,
    examples, FID) and a CSV per table; print the HTML path."""
    from biasmap.report import write_report

    try:
        path = write_report(
            run_dir,
            fid_weights=fid_weights,
            device=device,
            config_hash=config_hash,
            progress=lambda message: typer.echo(message, err=True),
        )
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(str(path))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
