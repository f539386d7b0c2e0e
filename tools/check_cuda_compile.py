#!/usr/bin/env python3
"""Compile every csrc/*.cu and csrc/*.cpp to an object file with nvcc: a build check that needs no GPU.

Uses the installed torch's headers and the flags its extension builder uses (``-std=c++20``,
``COMMON_NVCC_FLAGS``, the C++11 ABI define, ``TORCH_EXTENSION_NAME``), compiles into a temporary folder
(removed afterwards) and links nothing, so it runs on a CPU-only machine with a CPU torch wheel as long as
nvcc is installed. Exits 1 with the compiler output when a file fails; prints ``nvcc not found: skipped``
and exits 0 without nvcc.

    python tools/check_cuda_compile.py                 # sm_90
    python tools/check_cuda_compile.py --arch 80,90    # or MEGASWIFT_CUDA_ARCHS=80,90
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / 'csrc'
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS, in case a torch version stops exporting it
FALLBACK_NVCC_FLAGS = ['-D__CUDA_NO_HALF_OPERATORS__', '-D__CUDA_NO_HALF_CONVERSIONS__',
                       '-D__CUDA_NO_BFLOAT16_CONVERSIONS__', '-D__CUDA_NO_HALF2_OPERATORS__',
                       '--expt-relaxed-constexpr']


def find_nvcc() -> str | None:
    for var in ('CUDA_HOME', 'CUDA_PATH'):
        home = os.environ.get(var)
        if home and (Path(home) / 'bin' / 'nvcc').is_file():
            return str(Path(home) / 'bin' / 'nvcc')
    found = shutil.which('nvcc')
    if found:
        return found
    default = Path('/usr/local/cuda/bin/nvcc')
    return str(default) if default.is_file() else None


def cuda_include(nvcc: str) -> Path:
    """The toolkit's include folder (nvcc may be a wrapper script on PATH: ask it, else guess)."""
    home = Path(nvcc).resolve().parents[1]
    if (home / 'include' / 'cuda_runtime.h').is_file():
        return home / 'include'
    for guess in (os.environ.get('CUDA_HOME'), '/usr/local/cuda'):
        if guess and (Path(guess) / 'include' / 'cuda_runtime.h').is_file():
            return Path(guess) / 'include'
    return home / 'include'


def compile_flags(nvcc: str, archs: list[str]) -> list[str]:
    import torch
    import torch.utils.cpp_extension as cpp_ext

    torch_include = Path(cpp_ext.include_paths()[0])
    flags = ['-std=c++20', '-O3', '--compiler-options', '-fPIC',
             f'-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}',
             '-DTORCH_API_INCLUDE_EXTENSION_H', '-DTORCH_EXTENSION_NAME=_C',
             *getattr(cpp_ext, 'COMMON_NVCC_FLAGS', FALLBACK_NVCC_FLAGS)]
    if not (torch_include / 'c10' / 'cuda' / 'impl' / 'cuda_cmake_macros.h').is_file():
        # CPU wheels lack this generated header; on Linux it only defines C10_CUDA_BUILD_SHARED_LIBS (Windows).
        flags.append('-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE')
    includes = [*cpp_ext.include_paths(), str(cuda_include(nvcc)),
                sysconfig.get_path('include', scheme='posix_prefix')]
    for inc in includes:
        flags += ['-isystem', inc]
    for arch in archs:
        flags += ['-gencode', f'arch=compute_{arch},code=sm_{arch}']
    return flags


def compile_one(nvcc: str, flags: list[str], src: Path, out_dir: Path) -> tuple[Path, int, str, float]:
    start = time.perf_counter()
    cmd = [nvcc, '-c', str(src), '-o', str(out_dir / (src.name + '.o')), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        output = f'$ {" ".join(cmd)}\n{output}'
    return src, proc.returncode, output, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default=os.environ.get('MEGASWIFT_CUDA_ARCHS', '90'),
                        help='comma-separated SM versions to compile device code for (default 90)')
    parser.add_argument('--jobs', type=int, default=int(os.environ.get('MEGASWIFT_CUDA_CHECK_JOBS', '0')),
                        help='parallel nvcc processes (default: one per file, at most the CPU count)')
    parser.add_argument('--keep', metavar='DIR', help='write the object files here and keep them')
    args = parser.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print('nvcc not found: skipped')
        return 0
    sources = sorted([*CSRC.glob('*.cu'), *CSRC.glob('*.cpp')])
    if not sources:
        print(f'no CUDA/C++ sources in {CSRC}: nothing to check')
        return 0
    archs = [a.strip().replace('sm_', '') for a in args.arch.split(',') if a.strip()]
    flags = compile_flags(nvcc, archs)
    jobs = args.jobs if args.jobs > 0 else min(len(sources), os.cpu_count() or 1)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='megaswift-cuda-check-') as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda s: compile_one(nvcc, flags, s, out_dir), sources))
    failed = [r for r in results if r[1] != 0]
    for src, rc, output, seconds in results:
        status = 'ok' if rc == 0 else f'FAILED (exit {rc})'
        print(f'  {src.relative_to(REPO)}: {status} in {seconds:.1f}s')
        if output:  # the compiler's errors, or warnings on a success
            print('    ' + output.replace('\n', '\n    '))
    total = time.perf_counter() - start
    arch_text = ', '.join(f'sm_{a}' for a in archs)
    if failed:
        print(f'cuda-check: {len(failed)} of {len(results)} files failed to compile ({arch_text}, {nvcc})',
              file=sys.stderr)
        return 1
    print(f'cuda-check: {len(results)} files compiled for {arch_text} with {nvcc} in {total:.1f}s ({jobs} jobs)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
