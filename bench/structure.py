"""Structural figures of the `nvila_ft` package, measured the same way before and after a redesign.

    python bench/structure.py [--root nvila_ft] [--list]

Floors, lowest first: the package's top-level modules (atomic writes, errors, generic metrics, ...), `model`,
`data`, `domains`, `adapters`, `training`, `recipes`, `commands`, `cli`. A module may import its own floor or a
lower one. Counted: imports from a lower floor to a higher one; imports of another module's private (`_name`)
names; modules over 400 lines; functions over 60 lines; comparisons of an adapter `method` outside
`nvila_ft/adapters/methods/` (`method == "lora"`, `method in (...)`, `uses_lora`); in-house imports inside
functions; lines of code.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

FLOORS = ("model", "data", "domains", "adapters", "training", "recipes", "commands", "cli")
METHOD_MODULES = "nvila_ft/adapters/methods/"


def floor(module: str) -> int:
    """0 for the package's top-level modules, then the position of the sub-package in FLOORS."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return FLOORS.index(name) + 1 if name in FLOORS else 0


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def method_switch(node: ast.AST) -> bool:
    """`<x>.method == "..."`, `method in (...)`, `method != ...`, or a `uses_lora` test."""
    if isinstance(node, ast.Compare):
        sides = [node.left, *node.comparators]
        names = [s.attr if isinstance(s, ast.Attribute) else s.id if isinstance(s, ast.Name) else None for s in sides]
        return "method" in names or any(n and n.endswith("_METHODS") for n in names)
    return isinstance(node, (ast.Attribute, ast.Name)) and (getattr(node, "attr", None) or getattr(node, "id", None)) == "uses_lora"


def measure(root: Path) -> dict:
    figures = {"upward_imports": [], "private_imports": [], "modules_over_400": [], "functions_over_60": [],
               "method_switches": [], "local_imports": [], "lines": 0, "modules": 0}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        rel = str(path)
        figures["lines"] += lines
        figures["modules"] += 1
        if lines > 400:
            figures["modules_over_400"].append(f"{rel} ({lines})")
        me = module_name(path, root)
        tree = ast.parse(text)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn in functions:
            length = fn.end_lineno - fn.lineno + 1
            if length > 60:
                figures["functions_over_60"].append(f"{rel}:{fn.lineno} {fn.name} ({length})")
            for inner in ast.walk(fn):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("nvila_ft"):
                    figures["local_imports"].append(f"{rel}:{inner.lineno} {inner.module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nvila_ft"):
                if floor(node.module) > floor(me):
                    figures["upward_imports"].append(f"{rel}:{node.lineno} {me} -> {node.module}")
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        figures["private_imports"].append(f"{rel}:{node.lineno} {node.module}.{alias.name}")
            if not rel.startswith(METHOD_MODULES) and method_switch(node):
                figures["method_switches"].append(f"{rel}:{node.lineno}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="nvila_ft")
    parser.add_argument("--list", action="store_true", help="list every site, not only the counts")
    args = parser.parse_args()
    figures = measure(Path(args.root))
    summary = {k: (len(v) if isinstance(v, list) else v) for k, v in figures.items()}
    print(json.dumps(summary))
    if args.list:
        for key, sites in figures.items():
            if isinstance(sites, list):
                for site in sites:
                    print(f"{key}: {site}")


if __name__ == "__main__":
    main()
