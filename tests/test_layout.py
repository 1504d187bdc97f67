"""The house rules of the layout: the offline world stands alone, tools.py reads in the order its
table of contents gives, stages share only tools.py and rewards.py, and nothing points outside the
repository."""
import ast
import os
import re
from pathlib import Path

from conftest import ROOT

STAGES = ["build_trajectories", "sft", "rl", "synthesize", "evaluate"]
PROJECT = set(STAGES) | {"tools", "rewards", "toy_world"}


def imported_modules(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_toy_world_imports_nothing_from_the_project():
    assert not imported_modules(ROOT / "toy_world.py") & PROJECT


def test_stages_import_only_tools_and_rewards():
    for stage in STAGES:
        assert imported_modules(ROOT / f"{stage}.py") & PROJECT <= {"tools", "rewards"}, stage


def test_tools_sections_follow_the_table_of_contents():
    text = (ROOT / "tools.py").read_text()
    contents = re.findall(r"^  (\d)\. (\w+)", text.split('"""')[1], re.M)
    sections = re.findall(r"^# (\d)\. (\w+)", text, re.M)
    assert [n for n, _ in contents] == [str(i) for i in range(1, 7)]
    assert sections == contents
    # data -> knowledge -> the tools -> protocol -> runner -> policies, the expert last
    assert [word for _, word in sections] == ["Data", "Knowledge", "The", "The", "The", "The"]
    order = [text.index(marker) for marker in ("class Dataset", "class KnowledgeBase", "class Judge(",
                                               "class Toolbox", "def parse_turn", "def run_episodes",
                                               "class VLMPolicy", "def tiny_policy", "class ExpertPolicy")]
    assert order == sorted(order)


def project_files():
    skip = {".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache"}
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [s for s in subfolders if s not in skip]
        yield from (Path(folder) / n for n in names if Path(n).suffix in {".py", ".md", ".txt", ".json"})


def test_nothing_points_outside_the_repository():
    outside = ["..", "shared"]   # spelled apart, so this file does not match itself
    assert (ROOT / "docs/METHOD.md").is_file()
    for path in project_files():
        text = path.read_text(errors="ignore")
        assert "/".join(outside) not in text and outside[1] + "/METHOD" not in text, path
        if path.suffix == ".py":   # the code cites the method as docs/METHOD.md
            assert not re.search(r"(?<!docs/)METHOD\.md", text), path
