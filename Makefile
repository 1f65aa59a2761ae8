# The two commands of README.md:
#   make demo   the main job (installs what is missing, builds, runs it)
#   make test   every test: pytest, the LibTorch C++ tests and package (ctest), the CUDA emulator
# `make build` alone builds and installs the package (editable: `import dsa_ext` from anywhere).
# Each step is skipped when its inputs have not changed, so a second run starts at once.
PY ?= python3
TORCH_VERSION ?= 2.14.1
JOBS ?= $(shell nproc)
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export MAX_JOBS ?= $(JOBS)

STAMPS := build/stamps
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/cuda/*/*.cu csrc/cuda/*/*.cuh csrc/cuda/*/*.h) setup.py
TORCH_PREFIX = $(shell $(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')

.PHONY: demo test deps build install pytest ctest bench emulate clean

demo: build
	$(PY) python/train.py --out out/train

test: pytest ctest emulate

# torch pinned for this machine kind (a CUDA 13.0 build from local disk); Python test and
# program dependencies; GoogleTest for the C++ tests.
deps: $(STAMPS)/deps
$(STAMPS)/deps: pyproject.toml Makefile
	@mkdir -p $(STAMPS)
	$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
	  || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q numpy pytest expecttest hypothesis ninja tqdm matplotlib "transformers==5.24.0"
	dpkg -s libgtest-dev >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libgtest-dev)
	@touch $@

# The Python extension, built in place (ninja: only changed sources recompile), and installed.
build: $(STAMPS)/ext install
$(STAMPS)/ext: $(STAMPS)/deps $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

# `import dsa_ext` from any directory: this checkout installed editable, unless it already is (pip
# reuses the build above: seconds). Checked each time, since another checkout may have been
# installed since.
install: $(STAMPS)/ext
	@(cd / && env -u PYTHONPATH $(PY) -c "import importlib.util as u; print(u.find_spec('dsa_ext').origin)") \
	  2>/dev/null | grep -qxF "$(CURDIR)/dsa_ext/__init__.py" \
	  || $(PY) -m pip install -q --no-build-isolation --no-deps -e .

# tests/cuda_emulation runs the CUDA kernels from their source on a CPU emulator (about 6 minutes;
# part of `make test`, so that CI executes the CUDA kernels even without a GPU)
pytest: build
	$(PY) -m pytest tests -q --ignore=tests/cuda_emulation

emulate: build
	DSA_EXT_EMULATION=1 $(PY) -m pytest tests/cuda_emulation -q

ctest: $(STAMPS)/deps
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" >/dev/null
	cmake --build build/cmake -j $(JOBS)
	ctest --test-dir build/cmake --output-on-failure

bench: build
	$(PY) python/bench.py --out out/bench

clean:
	rm -rf build out dsa_ext/_C*.so
