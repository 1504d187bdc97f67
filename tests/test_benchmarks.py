"""benchmarks/heldout.py (policies compared on rl.py's held-out prompts, overall and per pair) and
benchmarks/rewrites.py (what a policy writes when it edits again)."""
import sys

import pytest

import tools
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import heldout  # noqa: E402
import rewrites  # noqa: E402


def test_per_pair_table_splits_the_greedy_reward_by_category_and_type(toy, monkeypatch, capsys):
    monkeypatch.setattr(tools, "load_dataset", lambda *a, **k: toy)
    heldout.main(["expert", "expert", "--samples", "0", "--eval-per-type", "2", "--per-pair"])
    out = capsys.readouterr().out
    overall = [line for line in out.splitlines() if line.startswith("| expert | greedy")]
    assert len(overall) == 2 and "+0.000 +- 0.000" in overall[1]   # the scripted expert is deterministic
    mean = float(overall[0].split("|")[3].split("+-")[0])
    pairs = [(c, t) for c in toy.train_categories for t in toy.types(c)]
    rows = [line for line in out.splitlines() if any(line.startswith(f"| {c} / {t} |") for c, t in pairs)]
    assert len(rows) == len(pairs)
    per_pair = [[float(v) for v in line.strip("|").split("|")[1:]] for line in rows]
    assert all(a == b for a, b in per_pair)
    # every pair has the same number of prompts, so the mean of the pair means is the overall mean
    assert abs(sum(a for a, _ in per_pair) / len(per_pair) - mean) < 1e-3


def test_rewrites_counts_the_looks_a_policy_writes_after_a_check(toy, monkeypatch, capsys):
    assert rewrites.look("Using the provided image, change only the pill surface to introduce a contamination: "
                         "a dark brown irregular blob about 7 pixels across, clearly visible. Keep the rest.") \
        == "a dark brown irregular blob"
    monkeypatch.setattr(tools, "load_dataset", lambda *a, **k: toy)
    rewrites.main(["expert", "--category", "pill", "--type", "contamination", "--prompts", "2", "--group-size", "2"])
    out = capsys.readouterr().out
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| a ")]
    # the expert copies the knowledge base's colour without a tone word, on every rewrite
    assert [r[0].strip() for r in rows] == ["a brown irregular blob"] and rows[0][2].strip() == "100%"
    assert f"{rows[0][1].strip()} rewrites in 4 episodes" in out
    with pytest.raises(tools.UserError, match="--type hole: pill has"):
        rewrites.main(["expert", "--category", "pill", "--type", "hole"])
