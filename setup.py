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
]

EXTRAS = {
    "test": ["pytest==9.2.0", "pytest-timeout", "hypothesis", "ruff==0.17.6", "mypy==2.4.1", "psutil"],
    "pretrained": ["gguf==0.19.0", "accelerate==1.15.0"],
    "deepspeed": ["deepspeed==0.19.8"],
}

setup(
    name="gwtf",
    version="0.1.0",
    description="Go With The Flow: crash-tolerant pipeline-parallel training on volunteer swarms",
    python_requires=">=3.11",
    packages=find_packages(include=["gwtf", "gwtf.*", "models", "models.*", "launch", "launch.*", "benchmarks", "benchmarks.*"]),
    package_data={"benchmarks": ["scenarios/*.toml"], "gwtf": ["resources/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["gwtf=gwtf.cli:main"]},
)
