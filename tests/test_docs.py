"""The docs are a manual of the project as it is: nothing refers to files outside the repository,
nothing narrates how the work went, links resolve, and the figures the commands print are the
figures the docs show."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from nanoseek import cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".toml", ".txt", ".cfg", ".js", ".html", ".css", ".yml", ".yaml", ".sh", "Makefile")
# spelled in pieces so this file does not match itself
OUTSIDE = ["../" + "shared", "REFERENCE" + ".md", "REFERENCE" + " §", "DESIGN" + ".md", "/work" + "/"]
HISTORY = ["session", "kept for the record", "after the review", "earlier trace", "fresh clone", "used to be",
           "re-measured", "ms/step", "x faster on", "× faster on", "goals:", "the old trace", "the old demo",
           "earlier round", "measured on the way", "as before"]


def project_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.splitlines()
            if f.endswith(TEXT) and (ROOT / f).is_file() and f != "tests/test_docs.py"]


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_nothing_refers_to_a_path_outside_the_repository():
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in project_files()
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
            if any(p in line for p in OUTSIDE)]
    assert not hits, "\n".join(hits)


def test_docs_and_docstrings_do_not_narrate_history():
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in project_files()
            if f.suffix in (".md", ".py") and not f.name.startswith("test_")
            for i, line in enumerate(f.read_text().splitlines(), 1)
            if any(p in line.lower() for p in HISTORY)]
    assert not hits, "\n".join(hits)


def test_no_line_count_claims():
    """Counts of lines drift with every edit; the docs do not make them."""
    for f in docs():
        assert not re.search(r"\d[\d,]* lines of (PyTorch|Python|code)", f.read_text()), f


def test_links_and_images_resolve():
    for f in docs():
        for target in re.findall(r"\]\(([^)#\s]+)\)", f.read_text()):
            if "://" not in target:
                assert (f.parent / target).exists(), (f.name, target)
        for name in re.findall(r"\bdocs/(\w+\.md)\b", f.read_text()):
            assert (ROOT / "docs" / name).is_file(), (f.name, name)


def block_after(doc: str, command: str) -> str:
    """The lines of the fenced block that starts with `$ command`, without that line."""
    text = (ROOT / doc).read_text()
    start = text.index(f"$ {command}\n") + len(f"$ {command}\n")
    return text[start:text.index("```", start)]


@pytest.mark.parametrize("doc, command", [("docs/cost.md", "nanoseek cost --preset v3-671b"),
                                          ("docs/model.md", "nanoseek info --preset v3-671b")])
def test_the_docs_show_what_the_command_prints(doc, command, capsys):
    """These two outputs depend on nothing measured, so the docs must show them exactly."""
    assert cli.main(command.split()[1:]) == 0
    assert capsys.readouterr().out == block_after(doc, command)


def test_v3_cost_figures_in_the_readme_are_the_command_s(capsys):
    assert cli.main(["cost", "--preset", "v3-671b"]) == 0
    out = capsys.readouterr().out
    total = re.search(r"^total .* (\S+K) .* (\$\S+M)$", out, re.M)
    mfu = re.search(r"^MFU +(\S+%) of the bfloat16 peak", out, re.M)
    readme = (ROOT / "README.md").read_text()
    assert total[1] == "2,788.0K" and total[2] == "$5.576M"
    assert f"2,788K H800 GPU-hours, {total[2]}, {mfu[1]} MFU" in readme
