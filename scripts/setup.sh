#!/usr/bin/env bash
# The README's set-up: a fresh machine with Python 3.10+, pip and gcc, and no torch.
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU wheel of torch 2.13.0; an unpinned torch would pull a CUDA build and GBs of CUDA packages.
python -m pip install "torch==2.13.0" ninja setuptools wheel
# The real CLIP BPE vocabulary ships in open_clip_torch; --no-deps keeps its CUDA torch out.
python -m pip install --no-deps open-clip-torch ftfy
# The CPU torch wheel does not pull triton; the tests run the Triton kernels in its interpreter.
python -m pip install --no-deps "triton==3.7.1"
# Builds biasmap._C against the torch installed above (no build isolation).
python -m pip install --no-build-isolation -e ".[test]"
