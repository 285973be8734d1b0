"""`biasmap info` / `python -m biasmap.info`: which backend can run each op here, and why not."""

from __future__ import annotations

import platform


def backend_report() -> str:
    """A markdown table of ops x backends ("yes" or the reason it is missing), plus versions."""
    import torch

    from biasmap.ops import backends, native

    table = backends.availability()
    names = list(backends.BACKENDS)
    lines = [
        f"biasmap {_version()} | torch {torch.__version__} | python {platform.python_version()}",
        f"compiled extension: {'loaded' if native.LOAD_ERROR is None else native.LOAD_ERROR}",
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        "",
        "| op | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for op, reasons in table.items():
        cells = ["yes" if reasons[n] is None else f"no: {reasons[n]}" for n in names]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("biasmap")
    except PackageNotFoundError:
        return "(not installed)"


def main() -> None:
    print(backend_report())


if __name__ == "__main__":
    main()
