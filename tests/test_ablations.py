"""benchmarks/ablations.py: its rows are the paper's ablations as flags of the scripts, RL runs are
reused only with the row's settings, and the held-out episodes of the rows without training."""
import json
import sys

import pytest

import rl
import tools
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import ablations  # noqa: E402


def test_rows_are_the_two_tables_with_rl_on_every_seed():
    rows = ablations.plan_rows(ablations.get_args([]))
    assert [r["key"] for r in rows] == ["fixed-prompt", "pg", "pg-qe", "pg-qe-kr", "sft",
                                        "rl-task-seed0", "rl-task-seed1", "rl-task-ref-seed0",
                                        "rl-task-ref-seed1", "rl-seed0", "rl-seed1"]
    by_key = {r["key"]: r for r in rows}
    assert by_key["pg"]["tools"] == "PG,IG,MG" and by_key["pg-qe"]["tools"] == "PG,IG,QE,MG"
    task_only = rl.get_args(by_key["rl-task-seed1"]["train"][1:])
    assert (task_only.beta, task_only.gamma, task_only.seed, task_only.out) == (0, 0, 1, "runs/rl-task-seed1")
    full = rl.get_args(by_key["rl-seed0"]["train"][1:])
    assert (full.beta, full.gamma, full.policy) == (rl.rewards.BETA, rl.rewards.GAMMA, "runs/sft")
    table = ablations.markdown(rows, {}, ablations.get_args([]), 60)
    assert table.count("not measured yet") == len(rows)   # the table shows what has been measured
    with pytest.raises(tools.UserError, match="--rl-task: 1 folders for 2"):
        ablations.plan_rows(ablations.get_args(["--rl-task", "runs/a"]))


def test_an_rl_run_with_other_rewards_is_not_reused(tmp_path):
    folder = tmp_path / "rl"
    folder.mkdir()
    (folder / "run_config.json").write_text(json.dumps(vars(rl.get_args(["--seed", "0"]))))
    row = next(r for r in ablations.plan_rows(ablations.get_args(["--rl-task", f"{folder},{tmp_path / 'b'}"]))
               if r["key"] == "rl-task-seed0")
    with pytest.raises(tools.UserError, match="other beta, gamma"):
        ablations.train(row, ablations.get_args([]))


def test_rows_without_training_play_the_held_out_prompts(toy):
    args = ablations.get_args([])
    plan = rl.validation_prompts(toy, 1, 0)[:4]
    rows = {r["key"]: r for r in ablations.plan_rows(args)}
    fixed = ablations.held_out(rows["fixed-prompt"], toy, plan, args)
    assert "reward" not in fixed and len(fixed["episode_final_qe"]) == 4 and 0 <= fixed["final_qe"] <= 10
    pg_only = ablations.held_out(rows["pg"], toy, plan, args)
    assert None not in pg_only["episode_final_qe"]   # judged after the episode: the agent has no QE
    assert pg_only["attempts"] == 1.0 and pg_only["completed"] == 1.0
    expert = ablations.held_out(rows["pg-qe-kr"], toy, plan, args)
    assert expert["reward"] > 0.5 and len(expert["episode_rewards"]) == 4 and expert["reward_se"] >= 0
