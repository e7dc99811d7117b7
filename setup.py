"""megadiff: a Megatron-Core trainer for diffusion language models (LLaDA2)."""
from setuptools import find_packages, setup

setup(
    name="megadiff",
    version="0.1.0",
    description="Megatron-Core trainer for diffusion language models (LLaDA2.0)",
    python_requires=">=3.10",
    packages=find_packages(include=["megadiff", "megadiff.*", "checkpoint_converters", "checkpoint_converters.*"]),
    install_requires=[
        "megatron-core>=0.16.1",
        "torch",
        "safetensors",
        "transformers>=4.51",
        "sentencepiece",
        "numpy",
        "pyyaml",
        "psutil",
        "tqdm",
    ],
    extras_require={
        # apex is built from source (see README); it is not on PyPI.
        "gpu": ["transformer-engine[pytorch]"],
        "wandb": ["wandb"],
        "dev": ["pytest", "pytest-timeout", "ruff", "pyarrow", "matplotlib", "tensorboard"],
    },
)
