"""Builds dsa_ext._C: the CPU operators always, the CUDA operators when nvcc and a CUDA build of
torch are both present. Install with `pip install --no-build-isolation -e .` so pip never swaps
the torch the extension is compiled against.

Environment switches:
  DSA_EXT_CUDA=0|1      force the CUDA sources off/on (default: on when nvcc + CUDA torch exist)
  TORCH_CUDA_ARCH_LIST  GPU targets (default here "8.0;9.0"; the device check builds "9.0" only)
  MAX_JOBS              parallel compile jobs for ninja
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    flag = os.environ.get("DSA_EXT_CUDA")
    if flag is not None:
        return flag == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cpu_vector_flags():
    # The CPU kernels use ATen's Vectorized<float>; ATen compiles one copy per instruction set
    # and dispatches at run time, we compile one: AVX2+FMA on x86-64 (every x86 server since
    # 2013), the portable scalar version elsewhere.
    if platform.machine() in ("x86_64", "AMD64"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def build_extension():
    use_cuda = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", *_cpu_vector_flags()]
    if not use_cuda:
        return cpp_extension.CppExtension(
            "dsa_ext._C", sources, extra_compile_args={"cxx": cxx},
            include_dirs=[os.path.join(ROOT, "csrc")])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-DDSA_EXT_WITH_CUDA"]
    return cpp_extension.CUDAExtension(
        "dsa_ext._C", sources + _sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx + ["-DDSA_EXT_WITH_CUDA"], "nvcc": nvcc},
        include_dirs=[os.path.join(ROOT, "csrc")])


setup(
    name="dsa_ext",
    version="0.1.0",
    packages=find_packages(include=["dsa_ext", "dsa_ext.*"]),
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
