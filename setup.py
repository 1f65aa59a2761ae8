"""Builds dsa_ext._C: the CPU operators always, the CUDA operators when nvcc and a CUDA build of
torch are both present. `make build` compiles in place and installs the package editable; by
hand: `pip install --no-build-isolation -e .` (no isolation, so pip never swaps the torch the
extension is compiled against). Both compile in build/temp with ninja, so either one after the
other recompiles nothing.

Environment switches:
  DSA_EXT_CUDA=0|1      force the CUDA sources off/on (default: on when nvcc + CUDA torch exist)
  DSA_EXT_CPU_ISA       avx512|avx2|default: the CPU kernels' vector width (default: this CPU's)
  DSA_EXT_OPENMP=0      build the CPU kernels without OpenMP (they then run on one thread;
                        the default off Linux)
  TORCH_CUDA_ARCH_LIST  GPU targets (default here "8.0;9.0"; the device check builds "9.0" only)
  MAX_JOBS              parallel compile jobs for ninja
"""
import glob
import os
import platform

from setuptools import find_packages, setup

# torch derives CUDA_HOME from the nvcc on PATH; where nvcc is a link in /usr/local/bin that
# gives /usr/local, whose lib64 has no libcudart. Prefer the toolkit's own folder.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _want_cuda():
    flag = os.environ.get("DSA_EXT_CUDA")
    if flag is not None:
        return flag == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


def _cpu_vector_flags():
    """ATen's Vectorized is compiled for one instruction set here (ATen itself compiles one copy
    per set and dispatches at run time). The extension is always built on the machine that runs
    it (pip -e / make build), so take the widest set this CPU has: AVX-512 where present, else
    AVX2+FMA (every x86 server since 2013), else the portable scalar version. DSA_EXT_CPU_ISA=
    avx512|avx2|default overrides."""
    isa = os.environ.get("DSA_EXT_CPU_ISA")
    if isa is None:
        isa = "default"
        if platform.machine() in ("x86_64", "AMD64"):
            try:
                flags = open("/proc/cpuinfo").read().split()
            except OSError:
                flags = []
            isa = "avx512" if all(f in flags for f in AVX512_FLAGS) else "avx2"
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                "-include", os.path.join(CSRC, "cpu", "avx512_intrinsics.h")]  # GCC 12's false warnings
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                "-include", os.path.join(CSRC, "cpu", "avx512_intrinsics.h")]  # as above (AVX2 and the BF16 tiles)
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _torch_openmp_runtime():
    """The OpenMP runtime torch's CPU library loads (torch/lib/libgomp.so.1 in the Linux wheels),
    or None where torch brings none of its own (it then uses the system's)."""
    import torch

    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libgomp.so.1", "libgomp.so"):
        if os.path.exists(os.path.join(lib, name)):
            return os.path.join(lib, name)
    return None


def _openmp_flags():
    """(compile, link) flags. The kernels split their work with at::parallel_for, whose OpenMP
    code is inline header code compiled into the extension: without -fopenmp it runs on one
    thread. Link the runtime torch itself uses, by path, so that the process holds one OpenMP
    runtime (its SONAME is the one libtorch_cpu already loaded), not the compiler's own
    (tests/test_parallel.py checks both). GCC or a GOMP-compatible compiler on Linux; elsewhere
    (macOS: Apple clang has no -fopenmp) the kernels build without OpenMP and run on one thread."""
    if os.environ.get("DSA_EXT_OPENMP") == "0" or platform.system() != "Linux":
        return [], []
    runtime = _torch_openmp_runtime()
    return ["-fopenmp"], [runtime] if runtime else ["-fopenmp"]


def _system_includes(ext):
    """torch's and CUDA's headers as system headers (-isystem instead of -I): the hundreds of
    warnings GCC gives about them (ATen's '#pragma unroll', ...) stay out of the log; ours stay
    on (-Wall)."""
    third_party = [d for d in ext.include_dirs if d != CSRC]
    ext.include_dirs = [CSRC]
    for flags in ext.extra_compile_args.values():
        flags += [arg for d in third_party for arg in ("-isystem", d)]
    return ext


class BuildExt(cpp_extension.BuildExtension):
    """pip's editable install compiles in a fresh temporary folder, which would rebuild every
    source (a quarter of an hour with CUDA); one build folder for every way of building lets
    ninja recompile only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


def build_extension():
    use_cuda = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    omp_compile, omp_link = _openmp_flags()
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wall", *_cpu_vector_flags(), *omp_compile]
    if not use_cuda:
        return _system_includes(cpp_extension.CppExtension(
            "dsa_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=omp_link,
            include_dirs=[CSRC]))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-DDSA_EXT_WITH_CUDA"]
    return _system_includes(cpp_extension.CUDAExtension(
        "dsa_ext._C", sources + _sources("csrc/cuda/**/*.cu"),
        extra_compile_args={"cxx": cxx + ["-DDSA_EXT_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=omp_link, include_dirs=[CSRC]))


setup(
    name="dsa_ext",
    version="0.1.0",
    packages=find_packages(include=["dsa_ext", "dsa_ext.*"]),
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
