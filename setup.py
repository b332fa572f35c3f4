"""Build pyquant: the C++ CPU extension ``pyquant._C`` (always) and the CUDA
extension ``pyquant._C_cuda`` (only where torch has CUDA and nvcc is found).

Install with ``pip install --no-build-isolation -e .`` after torch.
"""
import glob
import json
import os
import platform
import shutil

from setuptools import setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cuda_buildable() -> tuple[bool, str]:
    if os.environ.get("PYQUANT_NO_CUDA") == "1":
        return False, "PYQUANT_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA"
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found"
    if not _sources("csrc/cuda/*.cu"):
        return False, "no CUDA sources"
    return True, ""


# csrc/cpu/arch_sources.json names the files only one architecture builds (its kernels); every
# other file of csrc/cpu is portable C++ and builds everywhere, with the portable kernels alone on
# an architecture the file does not list.
ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def cpu_sources(machine: str) -> list[str]:
    with open(os.path.join(HERE, "csrc", "cpu", "arch_sources.json")) as f:
        per_arch = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    arch = ARCH_ALIASES.get(machine.lower(), machine.lower())
    others = {name for a, names in per_arch.items() if a != arch for name in names}
    return [p for p in _sources("csrc/cpu/*.cpp") if os.path.basename(p) not in others]


cpu_args = ["-O3", "-std=c++17", "-fopenmp"]
extensions = [
    cpp_extension.CppExtension(
        "pyquant._C",
        cpu_sources(platform.machine()),
        extra_compile_args=cpu_args,
        extra_link_args=["-fopenmp"],
    )
]

ok, why = _cuda_buildable()
if ok:
    extensions.append(
        cpp_extension.CUDAExtension(
            "pyquant._C_cuda",
            _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
        )
    )
else:
    print(f"pyquant: skipping the CUDA extension ({why})")

setup(
    name="pyquant",
    version="0.1.0",
    description="2-bit affine-codebook quantization with CPU, Triton and CUDA kernels",
    packages=["pyquant", "pyquant.backends", "pyquant.quantizers", "pyquant.triton_kernels"],
    python_requires=">=3.10",
    ext_modules=extensions,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={
        "console_scripts": ["pyquant=pyquant.cli:main"],
        # vLLM calls pyquant.vllm:register in each of its processes: quant_method "pyquant" (pyquant/vllm.py)
        "vllm.general_plugins": ["pyquant = pyquant.vllm:register"],
    },
)
