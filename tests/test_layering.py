"""The house rules of the package, read from its source: lower layers never import higher ones,
recipes do not import each other, and each shared helper exists once."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffusion_opd"
LOWER = ("models", "rewards", "data", "budget.py")  # budget.py counts models, never runs a trainer
HIGHER = ("demo", "trainers", "evaluation")
RECIPES = ("opd", "nft", "grpo")


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: pathlib.Path) -> set[str]:
    """Every diffusion_opd module ``path`` imports (relative imports resolved), as dotted names."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("diffusion_opd"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("diffusion_opd"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)  # ``from . import world``
    return out


def test_the_import_reader_sees_relative_and_absolute_imports(tmp_path):
    found = _imports(PACKAGE / "demo" / "pipeline.py")
    assert "diffusion_opd.trainers.checkpoint" in found and "diffusion_opd.data.toy_world" in found


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_never_import_higher_ones(layer):
    paths = [PACKAGE / layer] if layer.endswith(".py") else list((PACKAGE / layer).rglob("*.py"))
    assert paths and all(p.is_file() for p in paths)
    bad = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p) if m.split(".")[1] in HIGHER) for p in paths}
    assert {k: v for k, v in bad.items() if v} == {}


def test_recipes_do_not_import_each_other():
    for name in RECIPES:
        others = {f"diffusion_opd.trainers.{o}" for o in RECIPES if o != name}
        assert not (_imports(PACKAGE / "trainers" / f"{name}.py") & others), name


@pytest.mark.parametrize("helper, home", [
    ("sample_seed", "seeds.py"), ("train_step_indices", "seeds.py"), ("eval_seed", "evaluation/core.py"),
    ("parse_dtype", "dtypes.py"), ("sha256_file", "files.py"), ("json_safe", "files.py"),
    ("write_json", "files.py"), ("task_scorer", "rewards/multi.py"), ("resolve_checkpoint", "trainers/checkpoint.py"),
])
def test_each_shared_helper_is_defined_once(helper, home):
    homes = [str(p.relative_to(PACKAGE)) for p in _modules()
             if any(isinstance(n, ast.FunctionDef) and n.name == helper for n in ast.walk(ast.parse(p.read_text())))]
    assert homes == [home]


def test_no_second_hasher_or_dtype_table():
    for path in _modules():
        text, rel = path.read_text(), str(path.relative_to(PACKAGE))
        if rel not in ("files.py", "seeds.py"):
            assert "hashlib" not in text, rel  # hashes: files.sha256_file; seeds: seeds.sample_seed
        if rel != "dtypes.py":
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Dict):
                    keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                    values = [ast.unparse(v) for v in node.values]
                    assert not ({"fp16", "bf16"} <= keys and any("float16" in v or "bfloat16" in v for v in values)), rel
