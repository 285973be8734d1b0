"""The `biasmap` command line."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer

_T = TypeVar("_T")

app = typer.Typer(
    help="BiasMap: discover and mitigate social bias in Stable Diffusion through "
    "cross-attention attribution maps.",
    no_args_is_help=True,
    add_completion=False,
)


def refuse(option: str, message: str) -> NoReturn:
    """Stop the command with a one-line error naming the option (exit 2, no traceback)."""
    typer.echo(f"error: {option}: {one_line(message)}", err=True)
    raise typer.Exit(2)


def one_line(message: str) -> str:
    """A message folded onto one line (library messages may span several)."""
    return " ".join(message.split())


def checked(option: str, check: Callable[..., _T], *args: Any) -> _T:
    """check(*args), with its ValueError turned into a one-line error naming the option."""
    try:
        return check(*args)
    except ValueError as error:
        refuse(option, str(error))


def check_choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    """Refuse a value outside `allowed`, listing what the option accepts."""
    if value not in allowed:
        refuse(option, f"unknown value {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_quantile(q: float) -> float:
    """The mask quantile q must be strictly inside (0, 1): at 0 or 1 a mask is the whole map or
    nothing, and every IoU would be 1 or 0."""
    if not 0.0 < q < 1.0:
        refuse("--q", f"must be a quantile strictly between 0 and 1, got {q}")
    return q


class _DropFallbackNotice(logging.Filter):
    """Drops transformers' "requires torchvision (not installed); falling back" notices."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


_FALLBACK_FILTER = _DropFallbackNotice()


def _quiet_third_party() -> None:
    """Drop third-party notices that fire on every command and concern no user choice
    (transformers' torchvision fallback, diffusers' and transformers' deprecations of their own
    arguments); other warnings, biasmap's included, still show. Idempotent."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_FALLBACK_FILTER)
    for module in ("diffusers", "transformers", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def _run_checked(action: Callable[[], _T]) -> _T:
    """Run the model-dependent part of a command; the errors of inputs that only the model can
    check (a concept absent from its tokenizer's view of the prompt, weights that do not load)
    become one-line errors naming the option."""
    from biasmap.discovery.tokens import ConceptNotFoundError
    from biasmap.models import ModelNotAvailableError

    try:
        return action()
    except ConceptNotFoundError as error:
        refuse("--concepts", str(error))
    except ModelNotAvailableError as error:
        refuse("--model", str(error))
    except ValueError as error:
        typer.echo(f"error: {one_line(str(error))}", err=True)
        raise typer.Exit(2) from None


@app.callback()
def _before_every_command() -> None:
    # Here rather than in main(), so that typer's CliRunner (tests) gets the same quiet output.
    _quiet_third_party()


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
    q: float = typer.Option(0.7, help="Mask quantile for IoU / BIoU, in (0, 1)."),
    cfg_half: str = typer.Option(
        "cond", help="CFG half whose queries give the maps: cond or uncond."
    ),
    softmax_over: str = typer.Option(
        "prompt", help="Softmax domain: prompt (real tokens) or padded (all 77)."
    ),
    height: int = typer.Option(
        None, min=8, help="Image height (with --width; default: the model's)."
    ),
    width: int = typer.Option(
        None, min=8, help="Image width (with --height; default: the model's)."
    ),
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
    from biasmap.audit.config import DTYPES, check_model
    from biasmap.discovery.trace import CFG_HALVES, SOFTMAX_DOMAINS
    from biasmap.models import PLANTED, RANDOM_MODELS, load_pipeline

    # `--concepts gender firefighter`: click options take one value each, so the words after
    # the first arrive as extra arguments; commas also separate concepts.
    words = [w.strip() for item in [*concepts, *(more_concepts or [])] for w in item.split(",")]
    words = [w for w in words if w]
    if len(words) != 2:
        refuse(
            "--concepts",
            f"give exactly two words of --attribution (demographic, then profession), got {words}",
        )
    if seed < 0:
        refuse("--seed", f"must be >= 0 (a torch generator seed), got {seed}")
    check_quantile(q)
    check_choice("--cfg-half", cfg_half, CFG_HALVES)
    check_choice("--softmax-over", softmax_over, SOFTMAX_DOMAINS)
    check_choice("--dtype", dtype, DTYPES)
    if (height is None) != (width is None):
        refuse("--height" if width is None else "--width", "give --height and --width together")
    # Any offline model, SDXL included: tracing needs no guided sampler.
    checked("--model", check_model, model, (*RANDOM_MODELS, PLANTED))
    checked("--device", _check_device, device)

    def generate_and_trace():
        pipe = load_pipeline(model, dtype, device)
        generators = [
            torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)
        ]
        size = {"height": height, "width": width} if height is not None else {}
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
        return images, tr.maps().cpu()

    images, attribution_maps = _run_checked(generate_and_trace)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
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


def _check_device(device: str) -> str:
    """The audit config's device check: 'auto', 'cpu', 'cuda' or 'cuda:<index>'."""
    from biasmap.audit.config import AuditConfig

    return AuditConfig.model_validate({"device": device}).device


@app.command()
def generate(
    profession: str = typer.Option(..., help="Profession word, e.g. firefighter."),
    axis: str = typer.Option("gender", help="Demographic axis: gender or race."),
    method: str = typer.Option(
        "biasmap",
        help="sd, biasmap, fd, fd+biasmap, hard, hard+biasmap, negative, negative+biasmap, "
        "or biasmap@down-64+up-64 (guidance on those blocks only).",
    ),
    seeds: str = typer.Option("0", help="Seeds: 0-3, 4 or 0,5,7 (each once, none negative)."),
    lambda_: float = typer.Option(100.0, "--lambda", min=0.0, help="Energy guidance strength."),
    preset: str = typer.Option("paper", help="paper or official (the authors' code)."),
    model: str = typer.Option(
        "planted",
        help="planted (the trained planted-world model shipped with biasmap), tiny, "
        "random-sd15 (random weights), a local folder or a hub id.",
    ),
    steps: int = typer.Option(50, min=1, help="Sampler steps."),
    guidance: float = typer.Option(None, help="CFG scale (default: the preset's)."),
    q: float = typer.Option(0.7, help="Mask quantile, in (0, 1)."),
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

    from biasmap.audit.config import (
        DTYPES,
        PRESET_NAMES,
        check_axis,
        check_method_blocks,
        check_method_family,
        check_methods,
        check_model,
        parse_seeds,
    )
    from biasmap.mitigation import guided_generate
    from biasmap.mitigation.adapters import adapter_for
    from biasmap.mitigation.methods import plan
    from biasmap.models import load_pipeline

    # The audit config's checks, so that generate and audit accept the same inputs.
    if not profession.strip():
        refuse("--profession", "must be a word such as firefighter, got an empty string")
    checked("--axis", check_axis, axis)
    checked("--method", check_methods, [method])
    seed_list = checked("--seeds", parse_seeds, seeds)
    check_choice("--preset", preset, PRESET_NAMES)
    check_choice("--dtype", dtype, DTYPES)
    check_quantile(q)
    checked("--model", check_model, model)
    checked("--method", check_method_family, model, [method])
    checked("--method", check_method_blocks, model, [method], None)
    checked("--device", _check_device, device)

    pipe = _run_checked(lambda: load_pipeline(model, dtype, device))
    folder = Path(out)
    results = []
    for seed in seed_list:
        settings = plan(method, profession, axis, seed)
        output = _run_checked(
            lambda settings=settings, seed=seed: guided_generate(
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
        )
        folder.mkdir(parents=True, exist_ok=True)
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
        "model_family": adapter_for(pipe).family,
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
    from biasmap.audit.lock import RunLockedError, describe_holder
    from biasmap.audit.runner import RunFolderMismatchError, run_audit
    from biasmap.audit.store import CorruptPartWarning

    cli_values = {"executor": executor, "workers": workers, "threads": threads}
    extra = [f"{name}={value}" for name, value in cli_values.items() if value is not None]
    try:
        settings = load_config(config, [*(overrides or []), *extra])
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    try:
        with warnings.catch_warnings():
            # Reported once, below, with what was done about them.
            warnings.simplefilter("ignore", CorruptPartWarning)
            summary = _run_checked(lambda: run_audit(settings, progress=progress))
    except (RunFolderMismatchError, RunLockedError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if summary.stale_lock:
        typer.echo(
            f"took over the lock of a run that ended without releasing it "
            f"({describe_holder(summary.stale_lock)})",
            err=True,
        )
    if summary.check.corrupt:
        typer.echo(summary.check.summary(), err=True)
    if summary.temporaries_removed:
        typer.echo(
            f"removed {summary.temporaries_removed} temporary file(s) left by a killed run",
            err=True,
        )
    if summary.lost_images:
        typer.echo(
            f"{summary.lost_images} stored image(s) were missing or unreadable; regenerated",
            err=True,
        )
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
    q: float = typer.Option(
        None,
        help="Re-threshold every IoU and BIoU at this mask quantile, in (0, 1), from the maps "
        "the audit stored, into RUN_DIR/report-q<Q>/ (no regeneration; exact for unguided "
        "methods). Default: the run's own IoU, into RUN_DIR/report/.",
    ),
) -> None:
    """Write RUN_DIR/report/index.html (the paper's tables, block charts, lambda trade-off,
    threshold analysis, examples, FID) and a CSV per table; print the HTML path."""
    from pathlib import Path

    from biasmap.audit.lock import LOCK_FILE
    from biasmap.audit.runner import RUN_FILE
    from biasmap.audit.store import ResultsStore
    from biasmap.audit.stored_maps import MissingMapsError
    from biasmap.report import write_report

    if q is not None:
        check_quantile(q)
    started = any((Path(run_dir) / name).is_file() for name in (RUN_FILE, LOCK_FILE))
    if started and not ResultsStore(run_dir).part_files():
        # An audit that has started but not committed its first batch: nothing to report yet,
        # which is no error.
        typer.echo(f"no results in {run_dir} yet (its audit has not committed a batch); no report")
        return
    try:
        path = write_report(
            run_dir,
            fid_weights=fid_weights,
            device=device,
            config_hash=config_hash,
            progress=lambda message: typer.echo(message, err=True),
            q=q,
        )
    except MissingMapsError as error:
        refuse("--q", str(error))
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(str(path))


# click's exception base class: recent typer releases vendor their own click, so it is found
# from typer's public BadParameter rather than imported from click.
_CLICK_EXCEPTION = next(
    kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "ClickException"
)


def main(args: list[str] | None = None) -> None:
    """The `biasmap` entry point: a usage error (a bad option value, a missing option) is one
    line on stderr and exit status 2, not click's framed box; exits with the command's status."""
    try:
        code = app(args=args, prog_name="biasmap", standalone_mode=False)
    except _CLICK_EXCEPTION as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # bare `biasmap`: the help, no error
            typer.echo(error.ctx.get_help() if error.ctx else error.format_message())
            code = 0
        else:
            typer.echo(f"error: {one_line(error.format_message())}", err=True)
            code = error.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        code = 1
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
