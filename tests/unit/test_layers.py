"""The import graph of dpo_dist/ against the layers declared in docs/DESIGN.md ("Layers"): no
import runs from a lower layer to a higher one, no stage imports another stage, DeepSpeed is
imported by the engine shell alone, the core imports no engine or model library, and no two
modules import each other in a circle. Every import counts, at the top of a file or inside a function."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dpo_dist"
DESIGN = PACKAGE.parent / "docs" / "DESIGN.md"

# Bottom to top; a module may import its own layer and those below it.
LAYERS = {
    "core": 0,      # dpo_dist.core.*: pure (data, tokenize, logps, loss, cache, ...)
    "base": 1,      # config, models, identity, quiet, the public logps/loss paths
    "engines": 2,   # dpo_dist.engines.*: DeepSpeed, Ray pools, checkpoints, the training loop
    "stages": 3,    # dpo_dist.stages.*: score, sft, train, generate, judge, evaluate, report
    "top": 4,       # cli, pipeline, sweep, launch, torchrun, fixtures
}
BASE = {"config", "models", "identity", "quiet", "logps", "loss"}
# Libraries the core never imports (engines, model hubs, plotting); `datasets` only to read a HF dataset.
NOT_IN_CORE = {"deepspeed", "ray", "transformers", "peft", "vllm", "openai", "matplotlib", "tensorboard"}
CORE_EXCEPTIONS = {("dpo_dist.core.readers", "datasets")}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    head = parts[1]
    if head in ("core", "engines", "stages"):
        return head
    return "base" if head in BASE else "top"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported name, line): dpo_dist modules resolved (`from dpo_dist.core import cache` is
    dpo_dist.core.cache), other libraries by their top-level name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub if sub in known else node.module, node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    return {m: imports(p, set(mods)) for m, p in mods.items()}


def violations() -> list[str]:
    bad = []
    for mod, found in graph().items():
        for name, line in found:
            where = f"{mod.replace('.', '/')}.py:{line}"
            lib = name.split(".")[0]
            if lib == "deepspeed" and mod != "dpo_dist.engines.deepspeed_engine":
                bad.append(f"{where} imports {name}: DeepSpeed is for dpo_dist/engines/deepspeed_engine.py alone")
            if layer(mod) == "core" and lib in NOT_IN_CORE | {"datasets"} and (mod, lib) not in CORE_EXCEPTIONS:
                bad.append(f"{where} imports {name}: the core imports no engine or model library")
            if not name.startswith("dpo_dist.") or name in ("dpo_dist.core", "dpo_dist.engines", "dpo_dist.stages"):
                continue
            if LAYERS[layer(name)] > LAYERS[layer(mod)]:
                bad.append(f"{where} imports {name}: {layer(mod)} below {layer(name)}")
            if layer(mod) == layer(name) == "stages" and name.split(".")[2] != mod.split(".")[2]:
                bad.append(f"{where} imports {name}: a stage never imports another stage")
    return bad


def circles() -> list[list[str]]:
    g = graph()
    edges = {m: sorted({n for n, _ in found if n in g}) for m, found in g.items()}
    seen, stack, on_stack, out = set(), [], set(), []

    def visit(m):
        seen.add(m)
        stack.append(m)
        on_stack.add(m)
        for n in edges[m]:
            if n in on_stack and n != m:
                out.append(stack[stack.index(n):] + [n])
            elif n not in seen:
                visit(n)
        stack.pop()
        on_stack.discard(m)

    for m in edges:
        if m not in seen:
            visit(m)
    return out


def test_no_import_against_the_declared_layers():
    assert violations() == []


def test_no_import_circle():
    assert circles() == []


def test_the_design_document_declares_these_layers():
    text = DESIGN.read_text()
    for name in ("core", "base", "engines", "stages", "top"):
        assert f"**{name}**" in text, f"docs/DESIGN.md names no layer **{name}**"


@pytest.mark.parametrize("bad, says", [
    ("from dpo_dist.stages import train\n", "core below stages"),
    ("import deepspeed\n", "DeepSpeed is for dpo_dist/engines/deepspeed_engine.py alone"),
    ("def f():\n    from transformers import AutoModel\n", "the core imports no engine or model library"),
])
def test_the_check_catches_an_import_against_the_layers(tmp_path, monkeypatch, bad, says):
    """The check itself, on a core module that imports upward (a copy of the package with one bad line)."""
    import shutil

    copy = tmp_path / "dpo_dist"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "core" / "errors.py").write_text((copy / "core" / "errors.py").read_text() + "\n" + bad)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    found = violations()
    assert found and all(f.startswith("dpo_dist/core/errors.py:") for f in found), found
    assert any(says in f for f in found), found
