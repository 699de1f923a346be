"""rayseg.layout: the masks output's names, built and parsed in one place (pure)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rayseg import layout, storage

RAYSEG = Path(layout.__file__).parent


@pytest.mark.parametrize("shard", [0, 7, 99999, 123456])
def test_names_parse_back_to_their_shard(shard):
    assert layout.record_shard(layout.record_name(shard)) == shard
    assert layout.part_shard(layout.part_name(shard)) == shard
    assert layout.record_name(7) == "shard-00007.json"
    assert layout.part_name(7) == "part-00007.parquet"


@pytest.mark.parametrize(
    "name",
    [
        "plan.json",
        "shard-.json",
        "shard-0001.json.bak",
        ".shard-00001.json.tmp-" + "0" * 32,  # a temporary (rayseg.storage)
        "shard-x.json",
        "shard-\u00b2.json",  # a digit to str.isdigit, not to int()
        "part-00001.parquet",
    ],
)
def test_other_names_are_no_shard_record(name):
    assert layout.record_shard(name) is None


def test_paths_under_out():
    out = storage.locate("s3://bucket/run")
    assert layout.plan_path(out).uri == "s3://bucket/run/_shards/plan.json"
    assert layout.record_path(out, 3).uri == "s3://bucket/run/_shards/shard-00003.json"
    assert layout.part_path(out, 3).uri == "s3://bucket/run/parquet/part-00003.parquet"
    assert layout.mask_path(out, "a.png").uri == "s3://bucket/run/masks/a.png"
    assert layout.mask_file(layout.mask_rel("a_mask_cats_1.png")) == "a_mask_cats_1.png"
    assert layout.voc_list_rel("val") == "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    assert set(layout.VOC_FOLDERS) >= {"VOCdevkit/VOC2012", "VOCdevkit/VOC2012/JPEGImages"}


def _literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the string literals in a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def test_no_other_module_spells_the_layout():
    # The names only the masks output has (masks/ and parquet/ also name commands, stages and
    # predict's own folder; help text describes the VOC folder in words).
    names = re.compile(r"(?<![\w-])(_shards|plan\.json|_lock\.json|_rayseg\.json|shard-|part-)")
    found = [
        f"{path.name}:{line}: {text!r}"
        for path in sorted(RAYSEG.glob("*.py"))
        if path.name != "layout.py"
        for line, text in _literals(path)
        if names.search(text)
    ]
    assert not found, "spell these through rayseg.layout:\n" + "\n".join(found)
