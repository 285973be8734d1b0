"""Builds biasmap._C: the op schemas (csrc/ops.cpp), the CPU kernels (csrc/cpu) and,
when a CUDA toolkit and a CUDA torch are present, the CUDA kernels (csrc/cuda).

Knobs (environment):
  BIASMAP_SKIP_EXT=1      build nothing; biasmap then runs on the reference path.
  FORCE_CUDA=1            build the CUDA kernels even when torch reports no GPU.
  BIASMAP_CPU_ONLY=1      build only the CPU kernels, even where CUDA is available.
  BIASMAP_CUDA_ARCHS      semicolon list of SM versions, default "80;90".
  BIASMAP_DEBUG=1         -O0 -g instead of -O3.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("BIASMAP_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("BIASMAP_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is header-inlined: without -fopenmp, _OPENMP is undefined in this
    # extension and every parallel region runs on one thread. Linking -fopenmp resolves to
    # the libgomp torch already loaded, so there is still one thread pool.
    cxx_flags = [*opt, "-std=c++20", "-fopenmp", "-fno-math-errno"]
    link_flags = ["-fopenmp"]
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    include_dirs = [os.path.join(ROOT, "csrc")]

    use_cuda = os.environ.get("BIASMAP_CPU_ONLY") != "1" and (
        os.environ.get("FORCE_CUDA") == "1" or (torch.cuda.is_available() and CUDA_HOME is not None)
    )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if use_cuda and cuda_sources:
        archs = os.environ.get("BIASMAP_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        ext = CUDAExtension(
            "biasmap._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": [*cxx_flags, "-DBIASMAP_WITH_CUDA"],
                "nvcc": [*opt, "-std=c++20", "--use_fast_math", "-DBIASMAP_WITH_CUDA", *gencode],
            },
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "biasmap._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["biasmap", "biasmap.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
