"""Install the mks2 package and its fused-kernel package.

The ``kernels/`` folder is installed under the import name ``mks2_kernels``: PyPI has a package
called ``kernels`` that ``transformers`` probes for, and a local package of that name would be
mistaken for it. The top-level ``configs/`` and ``ds_configs/`` folders ship as the package data of
``mks2._configs`` and ``mks2._ds_configs`` (found with ``mks2.config.bundled``), so a non-editable
install has its default run config and DeepSpeed templates.
"""

from setuptools import find_packages, setup

REQUIRES = [
    "torch>=2.1",
    # The tested version (requirements-ci.txt). Older ones lack the fix for frozen ZeRO-3 parameters under
    # activation recompute (deepspeedai/DeepSpeed#8148, after #8130): CheckpointError "saved [N] vs recomputed [0]".
    "deepspeed>=0.19.8,<0.20",
    "transformers>=4.45",
    "sentencepiece>=0.1.99",
    "pyarrow>=14",
    "omegaconf>=2.3",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "protobuf>=3.20",
    "pillow>=9",
    "numpy>=1.24",
]

PACKAGE_DIRS = {
    "mks2._configs": "configs",  # run configs (YAML): demo.yaml is the launchers' default
    "mks2._ds_configs": "ds_configs",  # DeepSpeed JSON templates
    "mks2._tools": "tools",  # the CLIs, run by the mks2 console script (mks2/cli.py)
    "mks2_kernels": "kernels",
}

EXTRAS = {
    "gpu": ["flash-attn>=2.5", "triton>=2.3"],
    "mpi": ["mpi4py>=3.1"],
    "monitor": ["tensorboard>=2.14", "wandb>=0.16"],  # train.tensorboard / train.wandb (requirements-ci.txt pins both)
    "dev": [
        "pytest>=7",
        "pytest-xdist>=3.5",  # the README test command runs -n 2 --dist loadgroup (tests/scheduling.py)
        "ruff>=0.4",
        "datasets>=2.16",
        "peft>=0.10",
        "triton>=2.3",
        "mpi4py>=3.1",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
}

setup(
    name="mks2",
    version="0.1.0",
    description="DeepSpeed training system for MKS2: visual memory and soft MoME inside Llama",
    python_requires=">=3.10",
    packages=find_packages(include=["mks2", "mks2.*"]) + list(PACKAGE_DIRS),  # + the folders mapped into it
    package_dir=PACKAGE_DIRS,
    package_data={
        "mks2._configs": ["*.yaml"],
        "mks2._ds_configs": ["*.json"],
        "mks2_kernels": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h", "README.md"],
    },
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mks2=mks2.cli:main"]},
)
