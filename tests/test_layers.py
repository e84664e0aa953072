"""The seams between the layers: what the library may import, what its messages may say, what the `ldm`
command loads before it is asked to do anything, and what the package declares."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from ldm import cli
from ldm.errors import InputError

REPO = Path(__file__).resolve().parents[1]
LIBRARY = sorted((REPO / "ldm").rglob("*.py"))
PIPELINE_TOOLS = ("mlflow", "prefect", "dvc", "dvc_data", "dvc_objects")
MLFLOW_ADAPTER = REPO / "ldm" / "interop" / "mlflow_models.py"


def _imports(path: Path) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node))
    return found


def test_the_library_imports_no_pipeline_tool_but_through_the_mlflow_adapter():
    offenders = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in LIBRARY
        for module, _ in _imports(path)
        if module.split(".")[0] in PIPELINE_TOOLS and not (path == MLFLOW_ADAPTER and module.startswith("mlflow"))
    ]
    assert offenders == []
    # The adapter is reached only from inside the CLI's sampling code, so plain `import ldm.cli` never loads it.
    importers = [path for path in LIBRARY if any(m == "ldm.interop.mlflow_models" for m, _ in _imports(path))]
    assert importers == [REPO / "ldm" / "cli.py"]
    top_level = {m for m, node in _imports(REPO / "ldm" / "cli.py") if node.col_offset == 0}
    assert "ldm.interop.mlflow_models" not in top_level


def _message_strings(path: Path) -> list[str]:
    """Every string constant of the module but its docstrings (which may explain how the pipeline uses it)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and (body := node.body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    }
    return [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_library_messages_name_no_dvc_command():
    offenders = [
        f"{path.relative_to(REPO)}: {text!r}" for path in LIBRARY for text in _message_strings(path) if "dvc " in text
    ]
    assert offenders == []


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"], ["convert", "from-diffusers", "--help"]])
def test_help_is_answered_without_loading_torch_or_the_models(argv):
    # How long `ldm --help` takes is measured in bench/cli_startup.py; here, what it loads.
    script = (
        "import sys\nfrom ldm.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = ('torch', 'transformers', 'PIL', 'mlflow', 'ldm.diffusion.pipeline')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "print('LOADED', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "usage: ldm" in out
    assert out.strip().splitlines()[-1] == "LOADED []"


def test_a_user_mistake_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["sample", "a cat", "--model", str(tmp_path / "nothing"), "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing does not exist" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from ldm.diffusion import pipeline

    def broken(*args, **kwargs):
        raise ValueError("an internal shape mismatch")  # a ValueError, but not the caller's mistake

    monkeypatch.setattr(pipeline.Text2Image, "from_pretrained", broken)
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match="internal shape mismatch") as raised:
        cli.main(["sample", "a cat", "--model", str(tmp_path / "model"), "-o", str(tmp_path / "a.png")])
    assert not isinstance(raised.value, InputError)


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    ours = {"ldm", "stages", "flows", "tests", "bench"}
    found = set()
    for folder in ("ldm", "stages", "flows"):
        for path in (REPO / folder).rglob("*.py"):
            for module, _ in _imports(path):
                top = module.split(".")[0]
                if top not in stdlib and top not in ours and top != "__future__":
                    found.add(top)
    return found


def test_every_directly_imported_package_is_declared():
    import tomllib

    declared = {
        requirement.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower().replace("_", "-")
        for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: providers.get(module)
        for module in _third_party_imports()
        if not {d.lower().replace("_", "-") for d in providers.get(module, [])} & declared
    }
    assert undeclared == {}, f"imported but not in pyproject's dependencies: {undeclared}"
