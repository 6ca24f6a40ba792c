#!/usr/bin/env python3
"""Size report for classes and functions (stdlib only).

    python tools/code_size.py [PATH=src/esdwatch] [--top N]
    python tools/code_size.py --check --max-class 400 --max-method 50 --under src/esdwatch/monitor

Lines are counted from the ``class``/``def`` line to the last line of the body (docstrings,
comments and blank lines inside included, decorators not). "methods" counts the functions
defined directly in the class body; "attrs" counts the distinct ``self.<name>`` attributes
assigned in ``__init__`` (for a class without ``__init__``, e.g. a dataclass, its annotated
class-level fields). Nested functions are listed on their own (``outer.<locals>.inner``) and
also count towards their parent.

With --check, every class under --under longer than --max-class and every function or method
under --under longer than --max-method is printed, and the exit status is 1 if there is any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Item:
    kind: str  # "class" or "def"
    path: Path
    line: int
    qualname: str
    lines: int
    methods: int = 0
    attrs: int = 0

    def where(self, root: Path) -> str:
        try:
            rel = self.path.relative_to(root)
        except ValueError:
            rel = self.path
        return f"{rel}:{self.line} {self.qualname}"


def _self_attrs(func: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    if not func.args.args:
        return set()
    me = func.args.args[0].arg
    names: set[str] = set()

    def collect(target: ast.expr) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                collect(elt)
        elif isinstance(target, ast.Starred):
            collect(target.value)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == me:
            names.add(target.attr)

    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                collect(t)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            collect(node.target)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "__setattr__" and node.args:
            # object.__setattr__(self, "name", value), as frozen dataclasses / slots classes do
            if (
                len(node.args) >= 2
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id == me
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                names.add(node.args[1].value)
    return names


def scan_file(path: Path) -> list[Item]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    items: list[Item] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                qual = prefix + child.name
                funcs = [n for n in child.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                init = next((f for f in funcs if f.name == "__init__"), None)
                if init is not None:
                    attrs = len(_self_attrs(init))
                else:
                    attrs = sum(
                        1 for n in child.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                    )
                items.append(
                    Item("class", path, child.lineno, qual, child.end_lineno - child.lineno + 1, len(funcs), attrs)
                )
                visit(child, qual + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + child.name
                items.append(Item("def", path, child.lineno, qual, child.end_lineno - child.lineno + 1))
                visit(child, qual + ".<locals>.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return items


def python_files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(root.rglob("*.py"))


def scan(root: Path) -> list[Item]:
    return [item for f in python_files(root) for item in scan_file(f)]


def _under(item: Item, under: Path) -> bool:
    p, u = item.path.resolve(), under.resolve()
    return p == u or u in p.parents


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default="src/esdwatch", help="file or directory (default: src/esdwatch)")
    ap.add_argument("--top", type=int, default=10, help="rows per table (default: 10)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a class/function under --under is too long")
    ap.add_argument("--max-class", type=int, default=400, help="longest allowed class, lines (default: 400)")
    ap.add_argument("--max-method", type=int, default=50, help="longest allowed function/method (default: 50)")
    ap.add_argument("--under", type=Path, default=None, help="subtree --check applies to (default: PATH)")
    args = ap.parse_args(argv)

    root = Path(args.path)
    if not root.exists():
        ap.error(f"{root} does not exist")
    items = scan(root)
    base = root if root.is_dir() else root.parent

    if args.check:
        under = args.under if args.under is not None else root
        if not under.exists():
            ap.error(f"--under {under} does not exist")
        bad = [
            i
            for i in items
            if _under(i, under)
            and ((i.kind == "class" and i.lines > args.max_class) or (i.kind == "def" and i.lines > args.max_method))
        ]
        for i in sorted(bad, key=lambda i: -i.lines):
            limit = args.max_class if i.kind == "class" else args.max_method
            print(f"{i.kind:5} {i.lines:5} lines > {limit:4}  {i.where(base)}")
        print(
            f"code_size --check {under}: {len(bad)} over the limits "
            f"(class {args.max_class}, function/method {args.max_method} lines)"
        )
        return 1 if bad else 0

    classes = sorted((i for i in items if i.kind == "class"), key=lambda i: -i.lines)
    funcs = sorted((i for i in items if i.kind == "def"), key=lambda i: -i.lines)
    print(f"{root}: {len(python_files(root))} files, {len(classes)} classes, {len(funcs)} functions/methods")
    print(f"\nLargest classes (top {args.top})")
    print(f"{'lines':>6} {'methods':>7} {'attrs':>5}  where")
    for i in classes[: args.top]:
        print(f"{i.lines:6} {i.methods:7} {i.attrs:5}  {i.where(base)}")
    print(f"\nLargest functions/methods (top {args.top})")
    print(f"{'lines':>6}  where")
    for i in funcs[: args.top]:
        print(f"{i.lines:6}  {i.where(base)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
