"""llama3hp: a performance-first trainer for the Llama 3 model family."""

__version__ = "0.1.0"


def has_cpp_ext() -> bool:
    """True when the compiled C++ index builders (`llama3hp._C`) are importable."""
    try:
        from llama3hp import _C  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return False
    return True
