"""What every CPU benchmark table prints with it: the CPU, its vector and matrix extensions, the
build of dsa_ext (OpenMP, the bfloat16 micro-kernels in use), the threads, and the measured
matmul ceilings (float32 and bfloat16, all threads and one), so a figure can be read against
the machine that produced it."""
from __future__ import annotations

import platform
import time

import torch

import dsa_ext
from dsa_ext import _C

FLAGS = ("avx2", "avx512_f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def timeit(fn, reps: int, warmup: int = 1) -> float:
    """The fastest wall time of fn() over reps runs, after warmup runs: on a shared machine the
    fastest run is the least disturbed one (the same rule for sparse and dense)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class threads:
    """with threads(n): torch (and so the dsa_ext kernels) uses n threads inside the block."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def cpu_flags() -> dict:
    """The extensions that bound these kernels and their dense baselines, as torch's cpuinfo sees them."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if not caps:  # older torch: the kernel's flags (Linux)
        try:
            names = set(open("/proc/cpuinfo").read().split())
        except OSError:
            names = set()
        aliases = {"avx512_f": "avx512f"}
        return {f: aliases.get(f, f) in names for f in FLAGS} | {"cpu_name": platform.processor()}
    return {f: bool(caps.get(f, False)) for f in FLAGS} | {"cpu_name": caps.get("cpu_name", platform.processor())}


def matmul_ceiling(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in dtype on the current threads: the practical ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b, reps)


def machine(all_threads: int | None = None, size: int = 4096) -> dict:
    """The CPU, the build and the matmul ceilings (size^3) at all threads and at one."""
    all_threads = all_threads or torch.get_num_threads()
    info = {
        **cpu_flags(),
        "threads": all_threads,
        "torch": torch.__version__,
        "vector_isa": torch.backends.cpu.get_cpu_capability(),
        "dsa_ext_openmp": _C.openmp_version,
        "dsa_ext_bf16_tiles": _C.cpu_bf16_tiles_enabled(),
        "matmul_n": size,
    }
    for n, tag in ((all_threads, "all"), (1, "1")):
        with threads(n):
            for dtype in (torch.float32, torch.bfloat16):
                info[f"matmul_{str(dtype)[6:]}_{tag}_flops"] = matmul_ceiling(dtype, size)
    return info


def header(info: dict) -> str:
    """Two lines for the top of a table."""
    flags = " ".join(f"{f}={'yes' if info[f] else 'no'}" for f in FLAGS)
    omp = f"OpenMP {info['dsa_ext_openmp']}" if info["dsa_ext_openmp"] else "no OpenMP (one thread)"
    tiles = "AVX512-BF16 bf16 tiles" if info["dsa_ext_bf16_tiles"] else "widening bf16 path"
    ceil = ", ".join(f"{dt} {info[f'matmul_{dt}_all_flops'] / 1e12:.2f} ({info[f'matmul_{dt}_1_flops'] / 1e12:.2f})"
                     for dt in ("float32", "bfloat16"))
    return (f"CPU {info['cpu_name']}, {info['threads']} threads, torch {info['torch']} ({info['vector_isa']}); "
            f"{flags}; dsa_ext {dsa_ext.__version__}: {omp}, {tiles}\n"
            f"matmul ceiling {info.get('matmul_n', 4096)}^3, TFLOP/s at {info['threads']} threads (1 thread): {ceil}")
