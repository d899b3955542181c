"""docs/method.md names config keys, files, presets and Python objects: each must exist.

The user-facing account of the method cannot go stale silently: a renamed or misspelled
``method.*`` key, a moved file, a deleted preset or a renamed function fails here.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from dat.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "method.md"
SECTIONS = ("data", "model", "method", "optim", "perf", "train")
KEY = re.compile(rf"^(?:{'|'.join(SECTIONS)})\.[A-Za-z_][\w.]*(?:=.*)?$")
PATH = re.compile(r"^(?:dat|tests|bench|docs|examples|scripts)/[\w./-]+\.(?:py|yaml|md)$")
PRESET = re.compile(r"^(?:dat|aag)_\w+$|^\w+_cifar10_resnet18$")
OBJECT = re.compile(r"^dat(?:\.\w+)+")
FILE_NAME = re.compile(r"^[\w.-]+\.(?:safetensors|pt|pth|json|png)$")  # model.safetensors


def _spans(text: str) -> list[str]:
    """Inline code spans, outside fenced blocks."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", text)


def _key_exists(key: str) -> bool:
    node = Config()
    for part in key.split("."):
        if not is_dataclass(node) or part not in {f.name for f in fields(node)}:
            return False
        node = getattr(node, part)
    return True


def _resolves(dotted: str) -> bool:
    """``dat.a.b.C.attr``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def doc_problems(text: str) -> tuple[list[str], int]:
    """(what is wrong, how many references were checked) in a method doc's text."""
    problems, checked = [], 0
    for span in _spans(text):
        if FILE_NAME.match(span):
            continue
        if KEY.match(span):
            checked += 1
            key = span.split("=", 1)[0]
            if not _key_exists(key):
                problems.append(f"unknown config key {key!r}")
            elif "=" in span:
                try:
                    load_config(None, [span])
                except ConfigError as err:
                    problems.append(f"{span!r} is not a valid override: {err}")
        elif PATH.match(span):
            checked += 1
            if not (ROOT / span).exists():
                problems.append(f"missing file {span}")
        elif PRESET.match(span):
            checked += 1
            if not (ROOT / "dat" / "configs" / f"{span}.yaml").is_file():
                problems.append(f"unknown preset {span!r}")
        elif match := OBJECT.match(span):
            checked += 1
            if not _resolves(match.group(0)):
                problems.append(f"{match.group(0)} does not exist")
    return problems, checked


def test_every_reference_in_the_method_doc_exists():
    problems, checked = doc_problems(DOC.read_text(encoding="utf-8"))
    assert checked > 100, f"only {checked} references found: is the span parser broken?"
    assert not problems, "docs/method.md is stale:\n" + "\n".join(problems)


@pytest.mark.parametrize("typo", ["`method.omgea`", "`method.generator.amplitude_scal`",
                                  "`method.mix=mixx`", "`dat/spectrals.py`", "`dat_nojss`",
                                  "`dat.spectral.decompse`", "`train.val_pgd_step`"])
def test_a_typo_is_caught(typo):
    problems, checked = doc_problems(f"A reference: {typo}.")
    assert checked == 1 and len(problems) == 1


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_inside_the_method_doc_resolve():
    text = DOC.read_text(encoding="utf-8")
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert [a for a in links if a.startswith("#") and a[1:] not in anchors] == []
    readme = {_slug(h) for h in re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(),
                                           flags=re.M)}
    for link in links:
        if link.startswith(("#", "http")):
            continue
        path, _, anchor = link.partition("#")
        assert (DOC.parent / path).exists(), link
        if path == "../README.md" and anchor:
            assert anchor in readme, link


def test_section_references_point_at_existing_sections():
    """'docs/method.md, section N' in the code, presets and README names a real heading."""
    headings = set(re.findall(r"^## (\d+)\. ", DOC.read_text(encoding="utf-8"), flags=re.M))
    files = [ROOT / "README.md", *sorted((ROOT / "dat").rglob("*.py")),
             *sorted((ROOT / "dat" / "configs").glob("*.yaml"))]
    cited = {(f.name, n) for f in files
             for n in re.findall(r"docs/method\.md, sections? (\d+)", f.read_text())}
    assert cited, "no section references found"
    assert all(n in headings for _, n in cited), sorted(c for c in cited if c[1] not in headings)


def test_user_docs_do_not_point_at_the_internal_method_file():
    """METHOD.md lives outside the repository: users cannot follow a pointer to it."""
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", DOC,
             *sorted((ROOT / "dat" / "configs").glob("*.yaml"))]
    assert [f.name for f in files if "METHOD.md" in f.read_text()] == []
