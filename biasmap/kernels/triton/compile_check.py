"""Compile every Triton kernel for NVIDIA targets without a GPU: the Triton analogue of the nvcc
compile check of the CUDA kernels.

    python -m biasmap.kernels.triton.compile_check [--arch 80 90] [--quick]

Each kernel is compiled through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas
cubin) for representative dtypes and meta-parameters, including every autotune config of the
attention kernels. It prints registers, stack (spills) and shared memory per variant and exits
non-zero when a variant fails to compile, or needs more shared memory than the target has
(autotune configs excepted while another config of theirs fits). What it cannot check:
numerics and speed on a real GPU. Must run without TRITON_INTERPRET (the interpreter replaces
the kernels by Python functions). The full matrix takes about 10 minutes on 2 cores (triton
caches what it compiled in ~/.triton/cache); --quick about 2.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import interpreting

# Shared memory per block (opt-in maximum) of the targets.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Variant:
    kernel: object
    name: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict = field(default_factory=dict)


def _sig(kernel, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Signature for every parameter: constexprs by name, the rest from `types`, ints by default."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    return sig


def _attention_variants(quick: bool) -> list[Variant]:
    from . import attention

    out = []
    # (label, dtype, accumulation, BLOCK_D, forward BLOCK_L) as attention._blocks picks them.
    cases = [
        ("fp16 d40", "fp16", tl.float32, 64, 128),
        ("fp32 d160", "fp32", tl.float32, 256, 32),
        ("bf16 d80", "bf16", tl.float32, 128, 64),
        ("fp32 d80", "fp32", tl.float32, 128, 64),
        ("fp64 d8", "fp64", tl.float64, 16, 16),
    ]
    if quick:
        cases = [case for case in cases if case[0] != "bf16 d80"]
    acc_name = {tl.float32: "fp32", tl.float64: "fp64"}
    for label, dt, acc, block_d, block_l in cases:
        wide = acc == tl.float64
        for tuned, kernel_name in (
            (attention._fwd, "fwd"),
            (attention._bwd_dq, "bwd_dq"),
            (attention._bwd_dk, "bwd_dk"),
        ):
            kernel = tuned.kernel
            backward = kernel_name != "fwd"
            configs = [
                triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages)
                for c in (tuned.autotuned.configs if tuned.autotuned is not None else [])
            ]
            # float64 backward and wide heads run one pinned config, not the autotuner
            meta = attention.fixed_meta(block_d, wide and backward)
            if meta is not None:
                configs = [triton.Config({"BLOCK_N": meta["BLOCK_N"]}, num_warps=meta["num_warps"])]
            if quick:
                configs = configs[:1]
            for config in configs:
                constexprs = {
                    "HAS_MASK": True,
                    "ACC": acc,
                    "CHAIN_DOT": not wide,
                    "BLOCK_L": min(block_l, attention.BWD_MAX_BLOCK_L) if backward else block_l,
                    "BLOCK_D": block_d,
                    "BLOCK_T": 16,
                    **config.kwargs,
                }
                constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
                types = {
                    "q_ptr": f"*{dt}",
                    "k_ptr": f"*{dt}",
                    "g_ptr": f"*{dt}",
                    "probs_ptr": f"*{acc_name[acc]}",
                    "dq_ptr": f"*{dt}",
                    "tok_ptr": "*i64",
                    "mask_ptr": "*i1",
                    "lse_ptr": f"*{acc_name[acc]}",
                    "delta_ptr": f"*{acc_name[acc]}",
                    "dk_ptr": f"*{acc_name[acc]}",
                    "scale": "fp64",
                }
                out.append(
                    Variant(
                        kernel,
                        f"attention {kernel_name} {label} BLOCK_N={config.kwargs['BLOCK_N']} "
                        f"warps={config.num_warps} stages={config.num_stages}",
                        _sig(kernel, types, constexprs),
                        constexprs,
                        {"num_warps": config.num_warps, "num_stages": config.num_stages},
                    )
                )
    return out


def _resize_variants(quick: bool) -> list[Variant]:
    from . import resize

    out = []
    for dt, acc in (("fp32", tl.float32), ("fp16", tl.float32), ("fp64", tl.float64)):
        for per_map in (False, True):
            if quick and (dt != "fp32"):
                continue
            ptrs = {f"s{i}": f"*{dt}" for i in range(8)}
            constexprs = {
                "NUM": 7,
                "PER_MAP": per_map,
                "ACCUMULATE": False,
                "ACC": acc,
                "BLOCK": resize.FWD_BLOCK,
            }
            types = {"out_ptr": f"*{dt}", **ptrs}
            out.append(
                Variant(
                    resize._resize_fwd_kernel,
                    f"resize fwd {dt} per_map={per_map}",
                    _sig(resize._resize_fwd_kernel, types, constexprs),
                    constexprs,
                    {"num_warps": 4},
                )
            )
            acc_name = "fp64" if acc == tl.float64 else "fp32"
            grads = {f"d{i}": f"*{acc_name}" for i in range(8)}
            constexprs = {
                "NUM": 7,
                "PER_MAP": per_map,
                "ACC": acc,
                "PLANES": resize.BWD_PLANES,
                "BLOCK_I": resize.BWD_BLOCK_I,
                "BLOCK_J": resize.BWD_BLOCK_J,
                "BLOCK_O": resize.BWD_BLOCK_O,
            }
            types = {"g_ptr": f"*{dt}", **grads}
            out.append(
                Variant(
                    resize._resize_bwd_kernel,
                    f"resize bwd {dt} per_map={per_map}",
                    _sig(resize._resize_bwd_kernel, types, constexprs),
                    constexprs,
                    {"num_warps": 4},
                )
            )
    return out


def _row_variants(quick: bool) -> list[Variant]:
    from . import _common, masks, topk

    out = []
    n_maps = 2 if quick else 64
    shapes = [(n_maps, 4096), (64, 64)] if not quick else [(n_maps, 4096)]
    for n_rows, n in shapes:
        rows, block, warps = _common.row_tile(n_rows, n)
        for dt in ("fp32",) if quick else ("fp32", "fp64"):
            for minmax in (True, False):
                tiles = {"ROWS": rows, "BLOCK": block, "MINMAX": minmax}
                f64 = {"tau": "fp64", "logit_kn": "fp64", "flat_eps": "fp64"}
                io = {name: f"*{dt}" for name in ("x_ptr", "mask_ptr", "g_ptr", "dx_ptr")}
                scratch = {"stats_ptr": "*fp64", "coef_ptr": "*fp64", "gy_ptr": "*fp64"}
                for kernel, extra in (
                    (topk._topk_exact_fwd_kernel, {"MAX_ITERS": 200}),
                    (topk._topk_exact_bwd_kernel, {}),
                    (topk._topk_sinkhorn_fwd_kernel, {}),
                    (topk._topk_sinkhorn_bwd_kernel, {}),
                ):
                    constexprs = {**tiles, **extra}
                    out.append(
                        Variant(
                            kernel,
                            f"{kernel.__name__} {dt} rows={rows} block={block} minmax={minmax}",
                            _sig(kernel, {**f64, **io, **scratch}, constexprs),
                            constexprs,
                            {"num_warps": warps},
                        )
                    )
        tiles = {"ROWS": rows, "BLOCK": block}
        types = {
            "a_ptr": "*fp32",
            "b_ptr": "*fp32",
            "iou_ptr": "*fp32",
            "sums_ptr": "*fp64",
            "eps": "fp64",
        }
        out.append(
            Variant(
                masks._soft_iou_fwd_kernel,
                f"soft_iou fwd rows={rows} block={block}",
                _sig(masks._soft_iou_fwd_kernel, types, tiles),
                tiles,
                {"num_warps": warps},
            )
        )
        bwd = {"BLOCK": masks.ELEMENTWISE_BLOCK}
        types_bwd = {**types, "g_ptr": "*fp32", "da_ptr": "*fp32", "db_ptr": "*fp32"}
        out.append(
            Variant(
                masks._soft_iou_bwd_kernel,
                "soft_iou bwd",
                _sig(masks._soft_iou_bwd_kernel, types_bwd, bwd),
                bwd,
                {"num_warps": 4},
            )
        )
        types = {"a_ptr": "*i1", "b_ptr": "*i1", "out_ptr": "*fp32"}
        out.append(
            Variant(
                masks._mask_iou_kernel,
                f"mask_iou rows={rows} block={block}",
                _sig(masks._mask_iou_kernel, types, tiles),
                tiles,
                {"num_warps": warps},
            )
        )
        q_rows, q_block, q_warps = _common.row_tile(n_rows, n, masks.ROW_TILE_RADIX)
        for dt, wide in (("fp32", False), ("fp64", True), ("fp16", False)):
            if quick and dt != "fp32":
                continue
            constexprs = {
                "INCLUSIVE": True,
                "FLOAT": tl.float64 if wide else tl.float32,
                "UKEY": tl.uint64 if wide else tl.uint32,
                "BITS": 64 if wide else 32,
                "ROWS": q_rows,
                "BLOCK": q_block,
            }
            types = {"x_ptr": f"*{dt}", "out_ptr": "*i1", "weight": "fp64"}
            out.append(
                Variant(
                    masks._quantile_mask_kernel,
                    f"quantile_mask {dt} rows={q_rows} block={q_block}",
                    _sig(masks._quantile_mask_kernel, types, constexprs),
                    constexprs,
                    {"num_warps": q_warps},
                )
            )
    return out


def variants(quick: bool = False) -> list[Variant]:
    return _attention_variants(quick) + _resize_variants(quick) + _row_variants(quick)


def compile_variant(variant: Variant, arch: int):
    src = ASTSource(fn=variant.kernel, signature=variant.signature, constexprs=variant.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=variant.options)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL, ... of a cubin, read with the cuobjdump that ships in the triton wheel
    (register counts come from the driver otherwise, which needs a GPU)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"([A-Z]+):(\d+)", text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--quick", action="store_true", help="one variant per kernel family")
    parser.add_argument("--only", default="", help="variants whose name contains this text")
    args = parser.parse_args(argv)
    if interpreting():
        print("compile_check: unset TRITON_INTERPRET (the interpreter has no compiler)")
        return 2
    failures = 0
    # Autotune configs of one kernel and case: one that needs too much shared memory is
    # dropped by the autotuner at launch, which is fine while another config of the group fits.
    fitting: dict[str, int] = {}
    too_big: list[str] = []
    for arch in args.arch:
        for variant in [v for v in variants(args.quick) if args.only in v.name]:
            group = f"sm_{arch} {variant.name.split(' BLOCK_N=')[0]}"
            fitting.setdefault(group, 0)
            start = time.perf_counter()
            try:
                compiled = compile_variant(variant, arch)
            except Exception as exc:  # report every failure, then exit non-zero
                failures += 1
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"FAIL sm_{arch} {variant.name}: {type(exc).__name__}: {first}")
                continue
            shared = compiled.metadata.shared
            over = shared > SHARED_LIMIT.get(arch, 1 << 30)
            autotuned = " BLOCK_N=" in variant.name
            if over and not autotuned:
                failures += 1
            elif over:
                too_big.append(group)
            else:
                fitting[group] += 1
            usage = resource_usage(compiled.asm["cubin"])
            status = "ok  " if not over else ("skip" if autotuned else "FAIL")
            print(
                f"{status} sm_{arch} {variant.name}: "
                f"regs={usage.get('REG')} local(spill)={usage.get('LOCAL')} "
                f"stack={usage.get('STACK')} shared={shared} "
                f"({time.perf_counter() - start:.1f}s)"
            )
    for group in sorted(set(too_big)):
        if fitting[group] == 0:
            failures += 1
            print(f"FAIL {group}: no autotune config fits in shared memory")
    print(f"{failures} failure(s); 'skip' = more shared memory than the target has, a config")
    print("the autotuner drops at launch while others of its group fit")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
