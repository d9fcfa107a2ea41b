"""Distributed self-supervised pretraining of vision transformers (MAE today; DINO and CLIP next).

Exact, tested-together versions live in requirements.txt (``make install``); the ranges here are
what the code supports.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="ssl-pretrain",
    version="0.1.0",
    description="Distributed self-supervised pretraining of ViTs on SLURM with FSDP2 (MAE; evals read CLIP exports)",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain*", "data_pipelines*", "launch*", "evals*"]),
    package_data={"evals": ["templates/*.txt"]},
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "pillow",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm",
        "webdataset>=0.2.86",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "deepspeed": ["deepspeed>=0.16"],
        "slurm": ["submitit>=1.5"],
        "clip": ["open_clip_torch>=2.24"],
        "dev": ["pytest>=8", "pytest-timeout", "timm>=1.0", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "ssl-train=pretrain.train:main",
            "ssl-build-shards=data_pipelines.build_shards:main",
        ]
    },
)
