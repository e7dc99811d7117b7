"""megadiff: a Megatron-Core trainer for diffusion language models (LLaDA2)."""

from setuptools import find_packages, setup

# One console script per user-facing tool: the module whose main() it runs (megadiff.cli.NAME, or the
# tools/NAME.py script itself for the tools not moved there yet); tools/NAME.py runs the same main() as
# a script from a checkout. Not installed: tools/gpu_check.py, which runs the repo's tests/gpu and so
# needs a checkout.
CONSOLE_SCRIPTS = {
    "megadiff-train": "megadiff.cli.train",
    "megadiff-plan": "megadiff.cli.plan",
    "megadiff-convert-hf-to-mcore": "tools.convert_hf_to_mcore",
    "megadiff-convert-mcore-to-hf": "tools.convert_mcore_to_hf",
    "megadiff-moe-convert": "tools.moe_convertor",
    "megadiff-compare-logits": "megadiff.cli.compare_logits",
    "megadiff-generate": "megadiff.cli.generate",
    "megadiff-eval-gsm8k": "megadiff.cli.eval_gsm8k",
    "megadiff-build-gsm8k-dataset": "megadiff.cli.build_gsm8k_dataset",
    "megadiff-make-tiny-model": "megadiff.cli.make_tiny_model",
    "megadiff-make-synthetic-data": "megadiff.cli.make_synthetic_data",
    "megadiff-demo": "megadiff.cli.demo",
    "megadiff-preprocess-data": "megadiff.cli.preprocess_data",
    "megadiff-average-checkpoints": "tools.average_checkpoints",
    "megadiff-lm-eval": "megadiff.cli.lm_eval",
}

setup(
    name="megadiff",
    version="0.1.0",
    description="Megatron-Core trainer for diffusion language models (LLaDA2.0)",
    python_requires=">=3.11",
    # `tools` is a package so that its scripts' main() functions are the console scripts below.
    packages=find_packages(
        include=["megadiff", "megadiff.*", "checkpoint_converters", "checkpoint_converters.*", "tools"]
    ),
    entry_points={"console_scripts": [f"{name} = {module}:main" for name, module in CONSOLE_SCRIPTS.items()]},
    # Tested ranges (README "Versions"; megadiff/platform/compat.py records what each workaround
    # was checked on): stack (a) Python 3.11, torch 2.13, megatron-core 0.16.1, transformers 5.x;
    # stack (b) Python 3.12, torch 2.11, megatron-core 0.19.x, transformers 4.57.6.
    install_requires=[
        "megatron-core>=0.16.1,<0.20",
        "torch>=2.11,<2.14",
        "safetensors",
        "transformers>=4.57,<6",
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
        # LoRA adapters as Hugging Face PEFT adapters (exclude_modules needs 0.14; tested: 0.21.2 on
        # both stacks). Only the export tests and the PEFT reference of the LoRA tests import it.
        "peft": ["peft>=0.14"],
        # lm-evaluation-harness (megadiff.evaluation, tools/lm_eval.py); tested: 0.4.13 on both stacks.
        "eval": ["lm-eval>=0.4.13,<0.5"],
        "dev": [
            "pytest",
            "pytest-timeout",
            "ruff",
            "import-linter",
            "pyarrow",
            "matplotlib",
            "tensorboard",
            "peft>=0.14",
            "lm-eval>=0.4.13,<0.5",
        ],
    },
)
