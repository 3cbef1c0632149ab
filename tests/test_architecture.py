"""The arrows docs/ARCHITECTURE.md allows, read from the code's imports; and no package file over ~400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("simvq_common", "image_data", "evaluation", "stage1_tokenizer", "stage2_generator", "studies", "pipelines",
           "benchmarks", "scripts")
ALLOWED = {  # package: the project packages it may import
    "simvq_common": set(),
    "image_data": {"simvq_common"},
    "evaluation": {"simvq_common", "image_data"},
    "stage1_tokenizer": {"simvq_common", "image_data", "evaluation"},
    "stage2_generator": {"simvq_common"},
    "studies": {"simvq_common", "image_data", "evaluation", "stage1_tokenizer"},
    "pipelines": {"simvq_common", "image_data", "evaluation", "stage1_tokenizer", "stage2_generator", "studies"},
}


def imported_packages(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
    return (found & set(PROJECT)) - {package}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_only(package):
    wrong = {f"{path.relative_to(REPO)} imports {sorted(imported_packages(path, package) - ALLOWED[package])}"
             for path in (REPO / package).rglob("*.py") if imported_packages(path, package) - ALLOWED[package]}
    assert not wrong


def test_no_package_file_is_over_400_lines():
    long = [f"{p.relative_to(REPO)}: {n}" for package in ALLOWED for p in (REPO / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long
