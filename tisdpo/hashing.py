"""Content hashes shared by the artifact cache and the checkpoint sidecars, and hashes of the code
(a module and what it imports, or the whole tree) so that a cache or a resume knows which code made
what it would reuse."""
from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints and models are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of a canonical JSON dump (sorted keys); the cache key of a config slice."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ---------------------------------------------------------------------------------------
# code hashes: which source a cached artifact or a checkpoint was made by
# ---------------------------------------------------------------------------------------
PACKAGE = "tisdpo"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def module_path(module: str) -> Path | None:
    """The source file of a ``tisdpo`` module (a package's ``__init__.py``), or None."""
    parts = module.split(".")
    if not parts or parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_of(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, path: Path, tree: ast.AST) -> set[str]:
    """The ``tisdpo`` modules ``module`` imports anywhere in its file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    # a module's import also runs its parent packages' __init__
    closed = {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 2)}
    return {name for name in closed if name.startswith(PACKAGE) and module_path(name) is not None}


@lru_cache(maxsize=None)
def _parsed(path: Path) -> tuple[str, ast.AST]:
    """A source file's code as a normalised AST dump (comments and layout do not count) and its tree."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return ast.dump(tree, annotate_fields=False, include_attributes=False), tree


@lru_cache(maxsize=None)
def module_closure(module: str) -> tuple[str, ...]:
    """``module`` and every ``tisdpo`` module it imports, transitively (sorted)."""
    seen: set[str] = set()
    todo = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)]  # with its packages
    while todo:
        name = todo.pop()
        path = module_path(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo += sorted(_imported(name, path, _parsed(path)[1]) - seen)
    return tuple(sorted(seen))


@lru_cache(maxsize=None)
def code_hash(module: str, length: int = 12) -> str:
    """sha256 over the code of ``module`` and everything in ``tisdpo`` it imports, transitively:
    edit any of them (a new statement, a changed constant) and the hash changes; a comment or a
    reformatting does not. Read once per process."""
    digest = hashlib.sha256()
    for name in module_closure(module):
        digest.update(name.encode())
        digest.update(_parsed(module_path(name))[0].encode())
    return digest.hexdigest()[:length]


@lru_cache(maxsize=1)
def source_tree_hash(length: int = 16) -> str:
    """sha256 over every ``tisdpo/**/*.py`` (normalised as in :func:`code_hash`) and ``conf/**/*.yaml``
    (bytes): the working tree's code, whatever git says about it. Read once per process."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(_module_of(path).encode())
        digest.update(_parsed(path)[0].encode())
    for path in sorted((REPO_ROOT / "conf").rglob("*.yaml")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:length]
