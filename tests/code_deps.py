"""The code each DVC stage runs, from its stage module's import closure, and the check that dvc.yaml lists it.

A stage's `cmd` runs `flows.<stage>`, which calls `stages.<stage>`; the stage module and every repo module it
imports, at the top or inside a function, shape the stage's outputs, so each must be a dep or `dvc repro`
could leave a stale output and call it up to date. (The flows only log to Prefect and MLflow: they are not
deps, so a change to how a stage is tracked does not retrain it.) Imports under `if TYPE_CHECKING:` never
run and are not followed.

    python -m tests.code_deps           # list what dvc.yaml misses or lists in excess, per stage
    python -m tests.code_deps --write   # rewrite each stage's code deps in dvc.yaml to its closure
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE_ROOTS = ("ldm", "stages")  # the packages whose files are stage code
DVC_YAML = REPO / "dvc.yaml"


def module_file(module: str) -> Path | None:
    """The repo file of a dotted module name (a package's __init__.py), or None outside CODE_ROOTS."""
    if module.split(".")[0] not in CODE_ROOTS:
        return None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every module an import statement anywhere in `tree` may load, `from a import b` giving both a and a.b
    (b may be a submodule); imports under `if TYPE_CHECKING:` are skipped."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _with_packages(module: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: importing a module runs each enclosing package's __init__.py first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(module: str) -> set[Path]:
    """The repo files that importing `module` and calling into it may run."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        for name in _with_packages(pending.pop()):
            path = module_file(name)
            if path is None or path in seen:
                continue
            seen.add(path)
            pending.extend(_imported_modules(ast.parse(path.read_text(), filename=str(path))))
    return seen


def stage_names() -> list[str]:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return [stage.name for stage in repo.index.stages]


def closure_deps(stage: str) -> list[str]:
    """The code files stage `stage` runs, repo-relative and sorted: what dvc.yaml must list."""
    return sorted(str(p.relative_to(REPO)) for p in import_closure(f"stages.{stage}"))


def declared_code_deps() -> dict[str, list[str]]:
    """Each stage's deps inside CODE_ROOTS as DVC resolves dvc.yaml (files or folders, repo-relative)."""
    from dvc.repo import Repo

    declared: dict[str, list[str]] = {}
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            paths = [Path(dep.fs_path).resolve() for dep in stage.deps]
            inside = [p.relative_to(REPO) for p in paths if p.is_relative_to(REPO)]
            declared[stage.name] = [str(p) for p in inside if p.parts[0] in CODE_ROOTS]
    return declared


def _within(file: str, dep: str) -> bool:
    """Whether declaring `dep` (a file or a folder) covers `file`."""
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def problems() -> list[str]:
    """One line per stage and file where dvc.yaml and the stage's closure disagree."""
    lines = []
    for stage, declared in declared_code_deps().items():
        needed = closure_deps(stage)
        for missing in (f for f in needed if not any(_within(f, d) for d in declared)):
            lines.append(f"stage {stage!r} runs {missing} but dvc.yaml does not list it as a dep")
        for extra in (d for d in declared if not any(_within(f, d) for f in needed)):
            lines.append(f"stage {stage!r} lists {extra} as a dep but never imports it")
    return lines


def write_dvc_yaml() -> None:
    """Replace each stage's code deps in dvc.yaml by its closure, keeping its other deps, order and comments."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 120
    document = yaml.load(DVC_YAML)
    for stage, spec in document["stages"].items():
        others = [d for d in spec["deps"] if str(d).split("/")[0] not in CODE_ROOTS]
        spec["deps"][:] = others + closure_deps(stage)
    with DVC_YAML.open("w") as f:
        yaml.dump(document, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.code_deps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps to each closure")
    args = parser.parse_args(argv)
    if args.write:
        write_dvc_yaml()
    found = problems()
    print("\n".join(found) or "every stage's code deps match its import closure")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
