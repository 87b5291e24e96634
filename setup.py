"""gwtf: pipeline-parallel training of GPT/LLaMA-like models on volunteer machines that come and go.

Install torch first, on its own (a CPU wheel of it lies on the machines this project is built on):

    pip install torch==2.13.0
    pip install -e ".[test]"
"""

from setuptools import find_packages, setup

# Pins that resolve together on Python 3.11 (design.md section 3). Without the grpcio-tools pin,
# hivemind pulls a protobuf that ortools rejects.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "hivemind==1.1.12",
    "ortools==9.15.6755",
    "networkx>=3.6",
    "protobuf>=6.33.1,<6.34",
    "grpcio-tools<1.82",
    "numpy",
    "tqdm",
    "matplotlib",
    "tensorboard==2.21.0",  # `--tensorboard DIR` (torch.utils.tensorboard's writer); needs protobuf>=6.31.1,<8
    "aiohttp>=3.9,<4",  # gwtf dashboard's web server
    "cryptography==50.0.2",  # the direct path's AEAD (ChaCha20-Poly1305) and key derivation (HKDF)
    "datasets==5.2.0",  # fine-tuning data as it comes: JSON lines, CSV, Parquet, load_from_disk
    "xxhash>=3.4",  # frame checksums (XXH3-64); datasets depends on it too
    "peft==0.21.2",  # LoRA adapters across the swarm
]

EXTRAS = {
    "test": ["pytest==9.2.0", "pytest-timeout", "hypothesis", "ruff==0.17.6", "mypy==2.4.1", "psutil"],
    "pretrained": ["gguf==0.19.0", "accelerate==1.15.0"],
    "deepspeed": ["deepspeed==0.19.8"],
}

TOP_LEVEL_FOLDERS = ("models", "launch", "benchmarks")

setup(
    name="gwtf",
    version="0.1.0",
    description="Go With The Flow: crash-tolerant pipeline-parallel training on volunteer swarms",
    python_requires=">=3.11",
    # The repo keeps the design card's top-level folders (models/, launch/, benchmarks/), but an install claims one
    # top-level name only: they are installed as gwtf.models, gwtf.launch and gwtf.benchmarks.
    packages=[
        *find_packages(include=["gwtf", "gwtf.*"]),
        *(f"gwtf.{name}" for name in TOP_LEVEL_FOLDERS),
        *(f"gwtf.{name}.{sub}" for name in TOP_LEVEL_FOLDERS for sub in find_packages(where=name)),
    ],
    package_dir={f"gwtf.{name}": name for name in TOP_LEVEL_FOLDERS},
    package_data={
        "gwtf.benchmarks": ["scenarios/*.toml"],
        "gwtf": ["resources/*"],
        "gwtf.dashboard": ["static/*", "static/vendor/*"],  # the page and its vendored libraries (no CDN)
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["gwtf=gwtf.launch.cli:main"]},
)
