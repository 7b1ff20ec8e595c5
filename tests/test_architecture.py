"""Imports run one way: run.py -> stages -> runtime -> modules / weights / eval -> losses -> kernels / data / models / tasks.

Walks ``tisdpo/`` with ``ast``: no module imports a higher layer, the module-level import graph has
no cycle, and no import hides inside a function unless it is a documented lazy import of an
optional extra (a package a user may not have installed, or one only some runs need).
"""
from __future__ import annotations

import ast
from pathlib import Path

from import_graph import find_circle

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tisdpo"

# Lower number = lower layer. A module may import its own layer (acyclically) and lower ones.
LAYERS = {
    "constants": 0, "errors": 0, "jsonio": 0, "hashing": 0, "provenance": 0, "resolvers": 0, "redaction": 0,
    "checks": 0, "registry": 0,  # registry finds records by name through importlib, on demand
    "kernels": 1, "data": 1, "models": 1, "tasks": 1,
    "losses": 2,
    "modules": 3, "weights": 3, "eval": 3,
    "runtime": 4,  # cache, run dirs, checkpoints, failures, loggers, validation: no stage, no model code
    "stages": 5,   # each stage(ctx) -> artifact, and the runner that calls them in order
    "evaluate": 6,  # the eval-only entry point (python -m tisdpo.evaluate), above the stages
}

# Packages that may be imported inside a function: optional extras (not every install has them)
# and heavy libraries only some runs use. Each entry says why.
LAZY_ALLOWED = {
    "peft": "optional extra [lora]: only model.lora runs need it",
    "wandb": "only logger=wandb runs reach it",
    "matplotlib": "plots only; keeps `import tisdpo` light for workers",
    "datasets": "hub loading only; local files are read without it",
    "lm_eval": "optional extra [benchmarks]",
    "vllm": "optional extra [vllm]",
    "deepspeed": "optional extra",
    "submitit": "optional extra [launchers]",
    "wandb_workspaces": "optional extra [dashboard]",
    "openai": "optional: the HTTP judge works without it",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    is_package = modules()[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, *, top_level: bool) -> list[tuple[str, int]]:
    """(imported module, line) for the module-level imports (or the function-local ones)."""
    tree = ast.parse(path.read_text())
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local |= {id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and (id(node) in local) != top_level:
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            else:
                target = _resolve(module, node)
                # `from tisdpo.x import y` may name a submodule y
                found += [(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules() else target, node.lineno)
                          for alias in node.names]
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for module, path in known.items():
        graph[module] = {target for target, _ in imports(module, path, top_level=True) if target in known}
    return graph


def test_every_subpackage_has_a_layer():
    for module in modules():
        parts = module.split(".")
        assert len(parts) == 1 or parts[1] in LAYERS, f"{module}: add tisdpo.{parts[1]} to LAYERS (and docs/ARCHITECTURE.md)"


def test_no_module_imports_a_higher_layer():
    wrong = []
    for module, targets in internal_graph().items():
        wrong += [f"{module} (layer {layer(module)}) imports {t} (layer {layer(t)})" for t in targets if layer(t) > layer(module)]
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_have_no_cycle():
    cycle = find_circle(internal_graph())
    if cycle:
        raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_function_local_imports_are_only_optional_extras():
    hidden = []
    for module, path in modules().items():
        for target, line in imports(module, path, top_level=False):
            if target.split(".")[0] not in LAZY_ALLOWED:
                hidden.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    hidden = sorted(set(hidden))
    assert not hidden, "move these to the top of their module (or list an optional extra in LAZY_ALLOWED):\n" + "\n".join(hidden)


def test_the_checker_sees_a_cycle_and_a_hidden_import(tmp_path, monkeypatch):
    """The walk itself works: a planted cycle and a planted function-local import are found."""
    package = tmp_path / "tisdpo"
    (package / "weights").mkdir(parents=True)
    (package / "stages").mkdir()
    for d in (package, package / "weights", package / "stages"):
        (d / "__init__.py").write_text("")
    (package / "weights" / "a.py").write_text("from tisdpo.weights.b import x\n")
    (package / "weights" / "b.py").write_text("from tisdpo.weights.a import y\nx = 1\n")
    (package / "stages" / "c.py").write_text("def f():\n    import torch\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    try:
        test_module_level_imports_have_no_cycle()
    except AssertionError as error:
        assert "tisdpo.weights.a -> tisdpo.weights.b -> tisdpo.weights.a" in str(error)
    else:
        raise AssertionError("the planted cycle was not found")
    try:
        test_function_local_imports_are_only_optional_extras()
    except AssertionError as error:
        assert "c.py:2 imports torch" in str(error)
    else:
        raise AssertionError("the planted function-local import was not found")


# ---------------------------------------------------------------------------------------------
# what lives where: LightningModules in modules/, records beside their code, names only in conf/
# ---------------------------------------------------------------------------------------------
def _base_names(node: ast.ClassDef) -> set[str]:
    return {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}


def test_modules_hold_lightning_modules_only():
    """tisdpo/modules/ is LightningModules (plus the optimiser mixin they share); loss-side pieces
    (the triplet term, KTO's reference point, the bound loss) live in tisdpo/losses/."""
    for path in sorted((PACKAGE / "modules").glob("*.py")):
        if path.name in ("__init__.py", "optim.py"):
            continue
        classes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)]
        # a LightningModule directly, or through the shared policy-vs-reference base (modules/policy.py)
        assert any(_base_names(c) & {"LightningModule", "PolicyModule"} for c in classes), f"{path.name} defines no LightningModule"


def _conf_names(group: str) -> set[str]:
    return {p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if not p.stem.startswith("_")}


def test_loss_and_estimator_names_are_listed_only_in_conf():
    """No tuple, list or set literal in tisdpo/ names three or more losses or estimators: the conf
    groups are the registries, and a hand-copied list is what a new method forgets to update."""
    names = _conf_names("loss") | _conf_names("estimator")
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                listed = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(listed & names) >= 3:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} lists {sorted(listed & names)}")
    assert not found, "\n".join(found)


def test_every_loss_and_estimator_file_has_its_record():
    from omegaconf import OmegaConf

    from tisdpo.registry import estimator_record, loss_record

    for name in _conf_names("loss"):
        node = OmegaConf.load(ROOT / "conf" / "loss" / f"{name}.yaml")
        record = loss_record(node.get("loss", node))
        assert callable(record.fn), name
    for name in _conf_names("estimator"):
        assert estimator_record(name).kind in (None, "offline", "online"), name
