# The README's two commands on a fresh machine (Python >= 3.10, pip, gcc):
#   make demo   the main job: the offline audit of the shipped planted model, with its report
#   make test   the test suite
# Each first installs what is missing (scripts/setup.sh), once: the stamp file records a done
# set-up, and it is redone only when the packaging or the C++/CUDA sources change.

PYTHON ?= python
SETUP_STAMP := .setup-done
SETUP_INPUTS := scripts/setup.sh pyproject.toml setup.py \
	$(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup demo test

$(SETUP_STAMP): $(SETUP_INPUTS)
	bash scripts/setup.sh
	touch $(SETUP_STAMP)

setup: $(SETUP_STAMP)

demo: $(SETUP_STAMP)
	biasmap audit --config configs/demo.yaml

test: $(SETUP_STAMP)
	$(PYTHON) -m pytest
