#!/usr/bin/env bash
# The test command of README.md (and of CI): installs what the tests need, builds the compiled
# library, runs the suite with it (including the public-header C++ caller test), the op tests
# again with the AVX-512 micro-kernels off (a CPU without AVX-512), the suite again without the
# compiled library (pure-PyTorch reference ops), and compiles every CUDA kernel file with nvcc
# when nvcc is present. Extra arguments go to every pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q setuptools wheel ninja pybind11 numpy tqdm scikit-learn matplotlib \
    pytest pytest-benchmark scipy
# laplace-torch, for the cross-checks of tests/test_laplace_compat.py: its dependencies are listed
# by hand and installed without theirs, so that nothing replaces the installed torch (its
# declared dependencies would pull a CUDA torchvision, which breaks `import laplace`).
python -m pip install -q --no-deps "laplace-torch==0.3" asdfghjkl backpack-for-pytorch \
    curvlinops-for-pytorch einops opt_einsum torchmetrics lightning_utilities unfoldNd einconv \
    jaxtyping wadler_lindig linear_operator
# Hugging Face transformers/tokenizers/safetensors (the [hf] extra), for tests/test_transformers.py:
# pure Python or self-contained wheels that do not depend on torch.
python -m pip install -q "transformers>=5.0" tokenizers safetensors
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .

echo "== tests with the compiled library =="
FASTLLA_REQUIRE_NATIVE=1 FASTLLA_TEST_HEADER=1 python -m pytest -q "$@"
echo "== op tests with the compiled library, AVX-512 off (FASTLLA_DISABLE_AVX512=1) =="
FASTLLA_REQUIRE_NATIVE=1 FASTLLA_DISABLE_AVX512=1 python -m pytest -q \
    tests/test_ops.py tests/test_posterior.py tests/test_predictive.py "$@"
echo "== tests with the pure-PyTorch reference ops (FASTLLA_DISABLE_NATIVE=1) =="
FASTLLA_DISABLE_NATIVE=1 python -m pytest -q "$@"

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    echo "== nvcc compile check of csrc/cuda/*.cu =="
    bash scripts/check_cuda_compile.sh
else
    echo "== nvcc not found: CUDA compile check skipped =="
fi
