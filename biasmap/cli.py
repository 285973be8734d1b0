"""The `biasmap` command line."""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
