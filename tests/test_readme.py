"""The README's commands run as written: every flag it shows is one its command takes, every make
target and file it names exists (the README is a newcomer's first page; docs/ holds the depth)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rayseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(text: str) -> list[str]:
    """The fenced code blocks, without their fences."""
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def commands(text: str) -> list[list[str]]:
    """Every `rayseg ...` line of the README's code blocks, continuation lines joined, as words."""
    found = []
    for block in blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split("#", 1)[0].replace("[", " ").replace("]", " ").split()
            if words[:1] == ["rayseg"]:
                found.append(words[1:])
    return found


def subcommand_flags() -> dict[str, set[str]]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]  # argparse's subparsers action
    return {
        name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()
    }


def test_the_readme_stays_a_newcomers_page():
    assert len(README.encode()) <= 10_500, "README.md: depth belongs in docs/"
    assert "make demo" in README and "make test" in README


@pytest.mark.parametrize("words", commands(README), ids=lambda w: " ".join(w[:1]))
def test_every_flag_shown_is_one_the_command_takes(words):
    flags = subcommand_flags()
    name, *rest = words
    assert name in flags, f"README shows `rayseg {name}`, which is no command"
    shown = [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    assert shown or name == "demo"
    assert [f for f in shown if f not in flags[name]] == []


def test_the_readme_shows_every_command():
    assert {words[0] for words in commands(README)} == set(subcommand_flags())


def test_make_targets_and_files_it_names_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make ([a-z-]+)`|^make ([a-z-]+)", README, flags=re.M)):
        name = next(t for t in target if t)
        assert re.search(rf"^{name}:", makefile, flags=re.M), f"make {name}"
    for path in re.findall(r"\]\(([^)#]+)\)", README):  # the links
        assert (ROOT / path).exists(), path
    for path in re.findall(r"(jobs/[\w/.-]+\.(?:py|yaml))", README):
        assert (ROOT / path).exists(), path
