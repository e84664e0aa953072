"""dvc.yaml lists every file each stage runs, so `dvc repro` cannot leave a stale output after a code change."""

import pytest

from tests import code_deps


def test_every_stage_lists_exactly_the_code_it_runs():
    assert code_deps.problems() == []


def test_the_closure_follows_imports_inside_functions_and_enclosing_packages():
    deps = code_deps.closure_deps("sample")
    # ldm/diffusion/pipeline.py imports the LoRA loader inside Text2Image's method, not at its top.
    assert "ldm/models/lora.py" in deps
    assert {"ldm/__init__.py", "ldm/diffusion/__init__.py", "stages/__init__.py", "stages/sample.py"} <= set(deps)
    # Stages import neither the flows nor other stages' training code.
    assert not any(d.startswith("flows/") for d in deps)
    assert "ldm/training/unet.py" not in deps


def test_imports_under_type_checking_are_not_followed(tmp_path, monkeypatch):
    package = tmp_path / "ldm"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ldm.heavy import X\nelse:\n    import ldm.light\n"
    )
    (package / "heavy.py").write_text("")
    (package / "light.py").write_text("def f():\n    from ldm.lazy import y\n")
    (package / "lazy.py").write_text("")
    monkeypatch.setattr(code_deps, "REPO", tmp_path)
    assert {p.name for p in code_deps.import_closure("ldm")} == {"__init__.py", "light.py", "lazy.py"}


def test_a_missing_or_unused_dep_is_named_with_its_stage(monkeypatch):
    declared = code_deps.declared_code_deps()
    declared["cache_latents"].remove("ldm/data/images.py")
    declared["sample"].append("ldm/training/vae.py")
    monkeypatch.setattr(code_deps, "declared_code_deps", lambda: declared)
    assert code_deps.problems() == [
        "stage 'cache_latents' runs ldm/data/images.py but dvc.yaml does not list it as a dep",
        "stage 'sample' lists ldm/training/vae.py as a dep but never imports it",
    ]


def test_a_declared_folder_covers_its_files(monkeypatch):
    declared = code_deps.declared_code_deps()
    declared["sample"] = [d for d in declared["sample"] if not d.startswith("ldm/diffusion/")] + ["ldm/diffusion"]
    monkeypatch.setattr(code_deps, "declared_code_deps", lambda: declared)
    assert code_deps.problems() == []


@pytest.mark.parametrize("stage", code_deps.stage_names())
def test_stages_do_not_import_each_other(stage):
    others = {f"stages/{name}.py" for name in code_deps.stage_names()} - {f"stages/{stage}.py"}
    assert not others & set(code_deps.closure_deps(stage))
