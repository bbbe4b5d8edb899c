"""The package layout stays a map (docs/ARCHITECTURE.md): imports point down the layers, no module
imports another in a circle, few modules at the top, and no function grows past 60 lines or 10
parameters. A change that breaks one of these fails here, naming the place."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "qtrain"
#: each package (or top-level module) and its layer: a module may import its own layer and those below
LAYERS = {
    "errors": 0, "keys": 0, "fileio": 0,
    "quant": 1, "models": 1, "data": 1,
    "methods": 2,
    "train": 3, "parallel": 3, "store": 3,
    "run": 4,
    "cli": 5, "tools": 5, "theory": 5, "__main__": 5, "__init__": 5,
}
#: imports inside a function, each with the reason it is deferred
DEFERRED = {
    ("cli", "qtrain.run.runner"): "`qtrain --help` stays fast without torch",
    ("cli", "qtrain.run.validate"): "`qtrain --help` stays fast without torch",
    ("cli", "qtrain.parallel.ranks"): "torch",
    ("cli", "qtrain.parallel.launcher"): "torch",
    ("parallel.ranks", "qtrain.parallel.sync_batchnorm"): "only with sync_bn=true",
    ("__init__", "qtrain.store.checkpoint"): "`import qtrain` stays light",
}
#: other libraries imported inside a function: heavy or optional ones, each with its reason (the
#: standard library, and what every run imports anyway, belong at the top of the module)
DEFERRED_LIBRARIES = {
    "torchvision": "only the readers of torchvision's formats and the bench's baselines use it",
    "torch.utils.tensorboard": "imports tensorboard and protobuf: only a run that writes tb/ needs them",
    "torch.utils": "cpp_extension: only the fused kernel's first build needs the compiler toolchain",
    "onnx": "the export extra (qtrain-export only)",
    "onnxruntime": "the export extra (qtrain-export only)",
    "safetensors.torch": "the export extra (qtrain-export only)",
    "matplotlib": "the report's optional plots",
    "tqdm": "only with progress=true",
    "PIL": "the bench's JPEG folder only",
}


def modules():
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(path.relative_to(PKG).with_suffix("").parts)
        yield name.removesuffix(".__init__") if name != "__init__" else name, path


def imports(path: Path):
    """(imported module, line, inside a function?) for every qtrain import of a file."""
    tree = ast.parse(path.read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qtrain"):
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                       if (PKG / node.module.removeprefix("qtrain").strip(".").replace(".", "/")
                                           / f"{a.name}.py").exists()]
            for t in targets:
                yield t, node.lineno, id(node) in nested
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("qtrain"):
                    yield a.name, node.lineno, id(node) in nested


def layer_of(module: str) -> int:
    return LAYERS[module.removeprefix("qtrain").strip(".").split(".")[0] or "__init__"]


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in modules():
        for target, line, _ in imports(path):
            if target == "qtrain":
                continue
            if layer_of(target) > layer_of(name):
                wrong.append(f"qtrain/{path.relative_to(PKG)}:{line} imports {target} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = {name: {t.removeprefix("qtrain.") for t, _, _ in imports(path)} for name, path in modules()}
    graph = {k: {t for t in v if t in graph and t != k} for k, v in graph.items()}
    seen, stack, circles = set(), [], []

    def visit(node):
        if node in stack:
            circles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    # a package's __init__ re-exporting its own modules is not a circle of the layout
    circles = [c for c in circles if not all(p.split(".")[0] == c.split(".")[0] for p in c.split(" -> "))]
    assert not circles, "\n".join(circles)


def test_function_local_imports_have_a_reason():
    unlisted = [f"qtrain/{path.relative_to(PKG)}:{line} imports {target} inside a function"
                for name, path in modules() for target, line, local in imports(path)
                if local and (name, target) not in DEFERRED]
    assert not unlisted, "\n".join(unlisted)


def test_other_function_local_imports_defer_a_heavy_or_optional_library():
    unlisted = []
    for name, path in modules():
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                mods = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                        else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                for mod in mods:
                    if mod.startswith("qtrain") or mod.startswith("__future__"):
                        continue  # (qtrain's own: the test above)
                    if not any(mod == lib or mod.startswith(lib + ".") for lib in DEFERRED_LIBRARIES):
                        unlisted.append(f"qtrain/{path.relative_to(PKG)}:{node.lineno} imports {mod} inside "
                                        f"{func.name}(): import it at the top, or add it to DEFERRED_LIBRARIES")
    assert not unlisted, "\n".join(sorted(set(unlisted)))


def test_few_modules_at_the_top():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 10, top


@pytest.mark.parametrize("name,path", list(modules()), ids=[n for n, _ in modules()])
def test_functions_are_short_and_narrow(name, path):
    too_big = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [x for x in (a.vararg, a.kwarg) if x]
            params = [p for p in params if p.arg not in ("self", "cls")]
            lines = node.end_lineno - node.lineno + 1
            if lines > 60 or len(params) > 10:
                too_big.append(f"{node.name} (line {node.lineno}): {lines} lines, {len(params)} parameters")
    assert not too_big, "\n".join(too_big)


def test_the_code_identity_is_that_of_the_checkout_and_sees_changed_source(tmp_path):
    """result.json's git SHA and dirty flag: of the repository (not of the package folder), and a changed
    file under qtrain/ makes it dirty."""
    import inspect
    import subprocess

    from qtrain.keys import REPO_ROOT
    from qtrain.store.record import code_identity

    assert inspect.signature(code_identity).parameters["root"].default == REPO_ROOT
    assert (REPO_ROOT / "configs" / "config.yaml").exists() and (REPO_ROOT / "qtrain" / "keys.py").exists()
    (tmp_path / "qtrain").mkdir()
    (tmp_path / "qtrain" / "x.py").write_text("a = 1\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    assert code_identity(tmp_path)["git_dirty"] is False
    (tmp_path / "qtrain" / "x.py").write_text("a = 2\n")
    assert code_identity(tmp_path)["git_dirty"] is True
