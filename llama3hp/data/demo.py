"""A real post-training demo set with no download, from the default corpus (the Python stdlib).

`llama3hp prepare --demo sft|preference --out DIR` finds the stdlib's documented functions (`ast`)
and writes DIR/train.jsonl and DIR/heldout.jsonl (the rows, to read), then prepares them into DIR/train
and DIR/heldout:
- SFT: the user asks for the function with its signature and docstring, the assistant answers with
  its real source;
- preferences: the same prompt, the real source chosen; rejected is a plausible wrong answer: another
  function's body under the same signature, or the real body cut short (half of each).
Held out: every function of about one module in ten (by a hash of the module path), so no module is
in both splits. Functions are kept short (`MAX_LINES`, `MAX_CHARS`) so a pair fits a row of the tiny
model's 512 tokens, and the rows are the same on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
import textwrap
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama3hp.data.errors import DataError

MIN_BODY_LINES, MAX_LINES, MAX_CHARS = 3, 24, 900
HELDOUT_EVERY = 10  # one module in ten is held out
KINDS = ("sft", "preference")


@dataclass(frozen=True)
class Function:
    module: str  # dotted module path, e.g. "json.decoder"
    name: str
    signature: str  # "def name(args) -> ret:"
    docstring: str
    source: str  # the whole definition, dedented
    body: str  # the statements after the docstring, indented one level


def _functions(path: Path, module: str) -> Iterator[Function]:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.decorator_list or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno is None or len(node.body) < 2:
            continue
        src_lines = lines[node.lineno - 1 : node.end_lineno]
        source = textwrap.dedent("\n".join(src_lines))
        body_start = node.body[1].lineno - node.lineno
        if (
            len(src_lines) > MAX_LINES
            or len(source) > MAX_CHARS
            or len(src_lines) - body_start < MIN_BODY_LINES
        ):
            continue
        head = source.splitlines()[: node.body[0].lineno - node.lineno]
        if not head or not head[-1].rstrip().endswith(":"):  # one-line signatures only
            continue
        body = "\n".join(source.splitlines()[body_start:])
        yield Function(module, node.name, "\n".join(head), doc.strip(), source, body)


def stdlib_functions(root: Path | None = None) -> list[Function]:
    """The documented, short, undecorated functions of the stdlib sources, in path order."""
    from llama3hp.data.prepare import default_corpus_files

    root = root or Path(sysconfig.get_paths()["stdlib"])
    out: list[Function] = []
    for path in default_corpus_files():
        rel = path.relative_to(root).with_suffix("")
        if "test" in rel.parts or "idlelib" in rel.parts:  # tests and the IDE: repetitive, not library code
            continue
        out.extend(_functions(path, ".".join(rel.parts)))
    return out


def _prompt(f: Function) -> str:
    return (
        f"Write the Python function `{f.name}` of the module `{f.module}`. Its signature:\n\n"
        f"{f.signature.strip()}\n\nIts docstring:\n\n{f.docstring}"
    )


def _wrong(f: Function, others: Sequence[Function], rng: random.Random) -> str:
    """Another function's body under f's signature and docstring, or f's body cut in half."""
    head = f.source.splitlines()[: len(f.source.splitlines()) - len(f.body.splitlines())]
    if rng.random() < 0.5:
        for _ in range(10):
            o = others[rng.randrange(len(others))]
            if o.body.strip() != f.body.strip():
                indent = len(f.body) - len(f.body.lstrip())
                other = textwrap.indent(textwrap.dedent(o.body), " " * indent)
                return "\n".join(head) + "\n" + other
    lines = f.body.splitlines()
    return "\n".join(head + lines[: max(1, len(lines) // 2)])


def demo_rows(kind: str, functions: Sequence[Function], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the demo set of `kind`."""
    if kind not in KINDS:
        raise DataError(f"unknown demo {kind!r}: use one of {', '.join(KINDS)}")
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    for f in functions:
        prompt = _prompt(f)
        if kind == "sft":
            row: dict[str, Any] = {"messages": [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": f.source}]}  # fmt: skip
        else:
            row = {"prompt": prompt, "chosen": f.source, "rejected": _wrong(f, functions, rng)}
        row["id"] = f"{f.module}.{f.name}"
        split = heldout if zlib.crc32(f.module.encode()) % HELDOUT_EVERY == 0 else train
        split.append(row)
    return train, heldout


def build_demo(
    kind: str, out_dir: str | os.PathLike, *, workers: int = 2, overwrite: bool = False
) -> dict[str, Any]:
    """Write the demo set of `kind` into out_dir ({train,heldout}.jsonl and the prepared datasets
    out_dir/train, out_dir/heldout); returns {"train": manifest, "heldout": manifest}."""
    from llama3hp.data.prepare import prepare

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(
            f"output directory {out} already exists and is not empty; pass --overwrite or pick another"
        )
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = demo_rows(kind, stdlib_functions())
    if not train or not heldout:
        raise DataError("the stdlib yielded no demo functions; is the Python standard library installed?")
    manifests = {}
    for name, rows in (("train", train), ("heldout", heldout)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifests[name] = prepare([path], out / name, format=kind, workers=workers, overwrite=True)
    return manifests
