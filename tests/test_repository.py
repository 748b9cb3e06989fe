"""The repository stands alone: no link or path outside it, every Markdown link resolves, the README stays short,
and a script copied with the README's list of files trains in an empty folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".xml", ".cfg", ".toml", ".yaml", ".yml", ""}
# a path of some machine: /work/..., /root/..., /home/..., /Users/..., C:\...
ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:work|root|home|Users|mnt)/|\b[A-Z]:\\\\")
OUTSIDE = ("../shared", "GENESIS.md", "NOTES.md", "NOTES section")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if Path(n).suffix in TEXT_SUFFIXES and (ROOT / n).is_file()]


def test_nothing_points_outside_the_repository():
    files = tracked_text_files()
    assert len(files) > 20  # git sees the checkout
    offenders = []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if ABSOLUTE_PATH.search(line) or any(word in line for word in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_markdown_links_resolve_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 5  # README, method, tasks, results, genesis
    broken = []
    for page in pages:
        for target in MARKDOWN_LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            resolved = (page.parent / target.split("#")[0]).resolve()
            if ROOT not in resolved.parents and resolved != ROOT or not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def copy_commands() -> str:
    """The README's bash block under "Copy one script into your project"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Copy one script into your project", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0]


def test_a_script_copied_with_the_readmes_files_trains_in_an_empty_folder(tmp_path):
    commands = copy_commands().replace("../myproject", str(tmp_path / "myproject"))
    assert "cp dva_cartpole.py" in commands
    subprocess.run(["bash", "-euc", commands], cwd=ROOT, check=True)
    project = tmp_path / "myproject"
    assert not (project / "common" / "locomotion.py").exists()  # only what the README lists
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "dva_cartpole.py", "--num-envs", "2", "--image-size", "32",
                          "--image-width", "64", "--horizon", "4", "--max-iters", "2", "--eval-every", "0",
                          "--log-every", "1"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list(project.glob("runs/*/checkpoint.pt"))) == 1


def test_the_task_base_imports_no_task():
    """common/ imports form a chain, base <- cartpole/locomotion <- make_task <- scripts: the base alone pulls in
    no task module (and no make_task)."""
    code = ("import sys; import common.task; "
            "print(sorted(m for m in ('common.tasks', 'common.cartpole', 'common.locomotion') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"], out.stdout
