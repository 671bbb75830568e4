"""Build of the compiled library ``fastlla._C`` (op schemas + CPU and, optionally, CUDA kernels).

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

Environment:
    DEBUG=1              -O0 -g instead of -O3
    FORCE_CUDA=1         build the CUDA kernels even when torch sees no GPU (needs CUDA_HOME)
    FASTLLA_NO_CUDA=1    never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST CUDA architectures (default "9.0")
    MAX_JOBS             parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _use_cuda() -> bool:
    if _flag("FASTLLA_NO_CUDA") or CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or _flag("FORCE_CUDA")


def _sources(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(CSRC, pattern)))


def get_extensions():
    debug = _flag("DEBUG")
    use_cuda = _use_cuda()
    opt = ["-O0", "-g"] if debug else ["-O3"]

    cxx = [*opt, "-fdiagnostics-color=always"]
    link = ["-O0", "-g"] if debug else []
    # at::parallel_for is inline in the headers and only parallel when compiled with OpenMP
    # (the backend torch itself uses); the OpenMP runtime is the one torch already loads.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")

    sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    define_macros = []
    extension = CppExtension
    extra_compile_args = {"cxx": cxx}
    if use_cuda:
        extension = CUDAExtension
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += _sources("cuda/*.cu") + _sources("cuda/*.cpp")
        define_macros.append(("FASTLLA_WITH_CUDA", None))
        extra_compile_args["nvcc"] = [*opt, "--expt-relaxed-constexpr"]
        if debug:
            extra_compile_args["nvcc"].append("-lineinfo")

    return [
        extension(
            "fastlla._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=link,
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
