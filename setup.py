"""Install the mks2 package and its fused-kernel package.

The ``kernels/`` folder is installed under the import name ``mks2_kernels``: PyPI has a package
called ``kernels`` that ``transformers`` probes for, and a local package of that name would be
mistaken for it.
"""

from setuptools import find_packages, setup

REQUIRES = [
    "torch>=2.1",
    "deepspeed>=0.14",
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

EXTRAS = {
    "gpu": ["flash-attn>=2.5", "triton>=2.3"],
    "mpi": ["mpi4py>=3.1"],
    "dev": [
        "pytest>=7",
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
    packages=find_packages(include=["mks2", "mks2.*"]) + ["mks2_kernels"],
    package_dir={"mks2_kernels": "kernels"},
    package_data={"mks2": ["configs/*.yaml"], "mks2_kernels": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h", "README.md"]},
    install_requires=REQUIRES,
    extras_require=EXTRAS,
)
