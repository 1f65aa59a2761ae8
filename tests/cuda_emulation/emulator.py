"""Build and run the CUDA kernels of csrc/cuda on the CPU emulator (emu_cuda.h).

`build()` copies the headers (.cuh, .h) of csrc/cuda into a scratch directory, keeping their paths
under cuda/ (the sources include each other as "cuda/<family>/<file>", relative to csrc/, so with
the scratch directory first on the include path every such include finds the copy), swaps
cuda/common/tensor_core.cuh for the emulated one and turns `extern __shared__` arrays into the
emulator's per-block buffer, then compiles driver.cpp with AddressSanitizer and UBSan. `run(op, meta, tensors)` writes one case,
runs the driver and returns its outputs as torch tensors.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
CUDA_SRC = os.path.join(CSRC, "cuda")
TENSOR_CORE = "cuda/common/tensor_core.cuh"  # replaced by emu_tensor_core.cuh
BUILD = os.path.join(tempfile.gettempdir(), "dsa_ext_cuda_emulation")

_EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];")

_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}


def _sources() -> dict[str, str]:
    """Scratch-directory path (relative, "/"-separated) -> text of every file the emulator builds from."""
    out = {}
    for folder, _, files in os.walk(CUDA_SRC):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), CSRC).replace(os.sep, "/")
            if name.endswith((".cuh", ".h")) and path != TENSOR_CORE:
                text = open(os.path.join(folder, name)).read()
                out[path] = _EXTERN_SHARED.sub(r"\1* \2 = emu::dynamic_smem<\1>();", text)
    out[TENSOR_CORE] = open(os.path.join(HERE, "emu_tensor_core.cuh")).read()
    for name in ("emu_cuda.h", "driver.cpp"):
        out[name] = open(os.path.join(HERE, name)).read()
    return out


CUDA_INCLUDE = os.environ.get("CUDA_INCLUDE", "/usr/local/cuda/include")

# The marks of every test module here: opt-in (conftest.py), slow, and needs g++ + CUDA headers.
MARKS = [
    pytest.mark.emulation,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")),
                       reason="needs g++ and the CUDA headers"),
]


def source_dir(tag: str = "") -> tuple[str, str]:
    """Writes the emulation sources (kernel headers with the emulated tensor_core.cuh) into a
    directory named by their hash (and tag); returns (directory, hash). Compile with -I csrc after
    it (params.h)."""
    srcs = _sources()
    params = open(os.path.join(CSRC, "params.h")).read()  # included from csrc/ (-I), part of the hash
    digest = hashlib.sha1((tag + params + "".join(k + v for k, v in sorted(srcs.items()))).encode()).hexdigest()[:16]
    src_dir = os.path.join(BUILD, f"src-{digest}")
    os.makedirs(src_dir, exist_ok=True)
    for name, text in srcs.items():
        path = os.path.join(src_dir, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return src_dir, digest


def build() -> str:
    """Compiles the driver (cached on the sources' hash); returns its path."""
    sanitize = os.environ.get("DSA_EMU_SANITIZE", "address,undefined")  # "thread" finds races
    src_dir, digest = source_dir(sanitize)
    exe = os.path.join(BUILD, f"driver-{digest}")
    if os.path.exists(exe):
        return exe
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    cuda_inc = CUDA_INCLUDE
    cmd = ["g++", "-std=c++20", "-O1", "-g", f"-fsanitize={sanitize}", "-fno-sanitize-recover=all",
           "-pthread", "-I", src_dir, "-I", CSRC, "-I", cuda_inc, "-I", torch_inc, os.path.join(src_dir, "driver.cpp"),
           "-o", exe + ".tmp"]
    subprocess.run(cmd, check=True)
    os.replace(exe + ".tmp", exe)
    return exe


def _write(path: str, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    t.numpy().tofile(path)


def _read(path: str, dtype: torch.dtype, shape) -> torch.Tensor:
    raw = open(path, "rb").read()
    if dtype in (torch.float16, torch.bfloat16):
        return torch.frombuffer(bytearray(raw), dtype=torch.int16).view(dtype).reshape(shape).clone()
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone()


def run(meta: dict, tensors: dict[str, torch.Tensor], outputs: dict[str, tuple], timeout: float = 900):
    """Runs one case. tensors: file stem -> flat storage to write; outputs: file stem ->
    (dtype, shape) to read back. Returns (outputs dict, driver stdout)."""
    exe = build()
    with tempfile.TemporaryDirectory(prefix="emu-case-") as case:
        with open(os.path.join(case, "meta.txt"), "w") as f:
            for key, value in meta.items():
                f.write(f"{key} {int(value) if isinstance(value, bool) else value}\n")
        for stem, t in tensors.items():
            _write(os.path.join(case, stem + ".bin"), t)
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", TSAN_OPTIONS="halt_on_error=1")
        proc = subprocess.run([exe, case], capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise RuntimeError(f"emulated {meta.get('op')} failed with exit code {proc.returncode}")
        return {stem: _read(os.path.join(case, stem + ".bin"), dt, shape)
                for stem, (dt, shape) in outputs.items()}, proc.stdout


def launched(log: str, key: str) -> str:
    """The line of the driver's output that says which kernels it launched, the one starting with
    `key` ("engine=" for the indexer, "path=" for sparse_attention, "select " for top-k)."""
    lines = [line for line in log.splitlines() if line.startswith(key)]
    assert len(lines) == 1, f"expected one {key!r} line in the driver's output:\n{log}"
    return lines[0]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def storage_of(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The flat storage behind a strided view and the view's element offset into it."""
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes() // t.element_size(),))
    return flat, t.storage_offset()


def indexer_case(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float, causal: bool,
                 smem_limit: int = 227 * 1024, k_scale: torch.Tensor | None = None,
                 key_start: torch.Tensor | None = None, key_end: torch.Tensor | None = None) -> tuple[dict, dict]:
    """meta and tensors of an indexer call (q and k may be strided views; k_scale [B, S] float32
    for float8_e4m3fn inputs; key_start, key_end [B, T] int32 key ranges, unchecked: the kernels
    clamp them). smem_limit: a block's shared memory, as the device (an H100/H200: 227 KiB) or
    DSA_EXT_CUDA_SMEM_LIMIT gives it to the host code."""
    qs, q_off = storage_of(q)
    ks, k_off = storage_of(k)
    B, T, Hi, Di = q.shape
    meta = dict(dtype=dtype_name(q.dtype), B=B, T=T, S=k.shape[1], Hi=Hi, Di=Di,
                q_batch_stride=q.stride(0), q_row_stride=q.stride(1), q_head_stride=q.stride(2), k_batch_stride=k.stride(0), k_row_stride=k.stride(1),
                q_off=q_off, k_off=k_off, scale=repr(float(scale)), causal=bool(causal), smem_limit=smem_limit,
                k_scale=k_scale is not None, key_start=key_start is not None, key_end=key_end is not None)
    tensors = {"q": qs, "k": ks, "w": w.float().contiguous()}
    if k_scale is not None:
        tensors["ks"] = k_scale.float().contiguous()
    for name, r in (("key_start", key_start), ("key_end", key_end)):
        if r is not None:
            tensors[name] = r.to(torch.int32).contiguous()
    return meta, tensors


def attention_case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, scale: float,
                   smem_limit: int = 227 * 1024, min_warps: int = 4, sm_count: int = 132,
                   max_splits: int = 64) -> tuple[dict, dict]:
    """meta and tensors of a sparse_attention call; v may be a view of k's storage (MLA). The
    driver picks the kernels as sparse_attention.cu does (smem_limit, min_warps, sm_count,
    max_splits: what the device or DSA_EXT_CUDA_SMEM_LIMIT / DSA_EXT_CUDA_MIN_WARPS /
    DSA_EXT_CUDA_ATTN_MAX_SPLITS give the host code; the forward splits its index slots when
    the blocks are fewer than sm_count)."""
    qs, q_off = storage_of(q)
    ks, k_off = storage_of(k)
    v_in_k = v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    vs, v_off = storage_of(v)
    B, T, H, Dqk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    idx = indices.contiguous()
    meta = dict(dtype=dtype_name(q.dtype), B=B, T=T, S=S, H=H, Hkv=Hkv, Dqk=Dqk, Dv=Dv, K=idx.shape[-1],
                q_batch_stride=q.stride(0), q_row_stride=q.stride(1), q_head_stride=q.stride(2), k_batch_stride=k.stride(0), k_row_stride=k.stride(1),
                k_head_stride=k.stride(2), v_batch_stride=v.stride(0), v_row_stride=v.stride(1), v_head_stride=v.stride(2), idx_batch_stride=idx.stride(0),
                idx_row_stride=idx.stride(1), idx_head_stride=idx.stride(2) if idx.dim() == 4 else 0, q_off=q_off, k_off=k_off,
                v_off=v_off, v_in_k=v_in_k, scale=repr(float(scale)), smem_limit=smem_limit,
                min_warps=min_warps, sm_count=sm_count, max_splits=max_splits)
    tensors = {"q": qs, "k": ks, "idx": idx.view(-1)}
    if not v_in_k:
        tensors["v"] = vs
    return meta, tensors


def load_binding(name: str, binding: str, host_sources: list[str], include_dirs: list[str] = (),
                 cflags: list[str] = ()):
    """Builds and imports a CPU test binding (tests/cuda_emulation/<binding>) with the csrc/ host
    sources it needs, in a build directory of this torch version (torch's default cache is shared
    by torch versions, and 2.11 waits forever on the lock file 2.14 leaves there)."""
    from torch.utils import cpp_extension

    tag = hashlib.sha1(torch.__version__.encode()).hexdigest()[:8]
    build_dir = os.path.join(BUILD, f"ext-{name}-{tag}")
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(
        name=name, sources=[os.path.join(HERE, binding)] + [os.path.join(CSRC, s) for s in host_sources],
        extra_include_paths=[*include_dirs, CSRC], extra_cflags=["-O1", "-std=c++20", *cflags],
        build_directory=build_dir, verbose=False)
