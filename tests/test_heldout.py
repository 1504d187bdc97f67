"""benchmarks/heldout.py: policies compared on rl.py's held-out prompts, overall and per pair."""
import sys

import tools
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import heldout  # noqa: E402


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
