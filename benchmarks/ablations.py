"""
benchmarks/ablations.py -- the structure of the paper's Table 4 (which components matter) and
Table 5 (which rewards matter) on the toy world, as one markdown table. Every row is a flag of the
existing scripts; the script runs them, times each row and resumes row by row.

    python benchmarks/ablations.py --threads 1             # writes runs/ablations/ (table.md)
    python benchmarks/ablations.py --rl runs/rl,runs/rl-seed1 --rl-task runs/a,runs/b   # reuse runs

Rows (Table 4: components, no training until SFT; Table 5: rewards, from the same SFT policy):
  fixed prompt        synthesize.py --method fixed-prompt: one edit with a generic prompt, no agent
  PG only             the expert agent with --tools PG,IG,MG
  PG + QE             the expert agent with --tools PG,IG,QE,MG
  PG + QE + KR        the expert agent with every tool (the trajectories SFT learns from)
  SFT                 the tiny policy of sft.py (--sft)
  RL, R_task          rl.py --beta 0 --gamma 0, one row per --rl-seeds
  RL, R_task + R_ref  rl.py --gamma 0
  RL, all three       rl.py with its defaults (the paper's full model)
An RL row whose folder already holds a finished model (config.json and summary.json) reuses it,
after checking that its run_config.json has the row's reward weights and seed; otherwise rl.py
trains it there (--resume when a checkpoint is there).

Columns:
  held-out reward +- s.e.  greedy episodes on rl.py's held-out prompts (the training categories' test
                           images, rl.py --seed --eval-per-type), every row scored by the default
                           reward (rewards.py, R_ref from S_0 = 0) whatever it was trained with
  vs SFT                   the paired difference to the SFT row on the same prompts, +- its s.e.
  final QE, completed, mean attempts   of those episodes
  ResNet34 acc, pixel AP   evaluate.py on synthesize.py --per-type's set of the evaluation group
Decisions: an agent without the QE tool never has its answer judged, so the judge scores the
answered image after the episode, and R_task reads that score (the agent never saw it). The fixed
prompt plays no episode: it has no reward; its final QE is the judge's score of its one edit.

Each row's numbers go to OUT/rows/<row>.json as they are measured (a rerun skips what is there),
the sets to OUT/sets/<row>, evaluate.py's results to OUT/eval/<row>; the table to OUT/table.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rl           # noqa: E402
import synthesize   # noqa: E402
import tools        # noqa: E402

ALL_TOOLS = "PG,IG,QE,KR,MG"
# (key, label, what makes the set and the episodes); RL rows carry rl.py's reward flags
COMPONENT_ROWS = [
    ("fixed-prompt", "fixed prompt (no PG, QE, KR)", {"method": "fixed-prompt"}),
    ("pg", "PG only", {"policy": "expert", "tools": "PG,IG,MG"}),
    ("pg-qe", "PG + QE", {"policy": "expert", "tools": "PG,IG,QE,MG"}),
    ("pg-qe-kr", "PG + QE + KR (expert)", {"policy": "expert", "tools": ALL_TOOLS}),
]
RL_ROWS = [   # (flag holding the run folders, label, rl.py flags)
    ("rl_task", "RL, R_task", ["--beta", "0", "--gamma", "0"]),
    ("rl_task_ref", "RL, R_task + R_ref", ["--gamma", "0"]),
    ("rl", "RL, R_task + R_ref + R_beh (full)", []),
]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablations", help="folder for the rows, sets, evaluations and table")
    p.add_argument("--sft", default="runs/sft", help="the SFT policy (every RL row starts from it)")
    p.add_argument("--rl", default="runs/rl,runs/rl-seed1", help="rl.py runs with the default rewards, one per --rl-seeds")
    p.add_argument("--rl-task", default="runs/rl-task,runs/rl-task-seed1", help="rl.py --beta 0 --gamma 0 runs")
    p.add_argument("--rl-task-ref", default="runs/rl-task-ref,runs/rl-task-ref-seed1", help="rl.py --gamma 0 runs")
    p.add_argument("--rl-seeds", default="0,1", help="rl.py --seed of each RL run, in the order of the folders")
    p.add_argument("--rows", default=None, help="comma list of row keys to measure now (default: all; the table shows every row measured so far)")
    p.add_argument("--eval-per-type", type=int, default=8, help="held-out prompts per (training category, type)")
    p.add_argument("--per-type", type=int, default=10, help="synthesize.py samples per (category, type) for evaluate.py")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out prompts, synthesis and evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch threads here and in every script (1 when the cores are shared)")
    return p.parse_args(argv)


# ---- the rows -----------------------------------------------------------------------------------

def plan_rows(args) -> list:
    """Every row as a dict: key, label, what synthesize.py and the episodes run, and for RL rows the
    rl.py command that trains it."""
    rows = [dict(key=k, label=label, **spec) for k, label, spec in COMPONENT_ROWS]
    rows.append(dict(key="sft", label="+ SFT (tiny policy)", policy=args.sft, tools=ALL_TOOLS))
    seeds = [int(s) for s in tools.comma_list(args.rl_seeds, "--rl-seeds")]
    for flag, label, rl_flags in RL_ROWS:
        folders = tools.comma_list(getattr(args, flag), "--" + flag.replace("_", "-"))
        if len(folders) != len(seeds):
            raise tools.UserError(f"--{flag.replace('_', '-')}: {len(folders)} folders for {len(seeds)} --rl-seeds")
        for folder, seed in zip(folders, seeds):
            rows.append(dict(key=f"{flag.replace('_', '-')}-seed{seed}", label=f"{label}, seed {seed}",
                             policy=folder, tools=ALL_TOOLS,
                             train=["rl.py", "--policy", args.sft, "--seed", str(seed), "--out", folder, *rl_flags]))
    return rows


def run(command, threads) -> float:
    """Run a stage as a user would, from the repository root; returns its wall time."""
    print("$ python " + " ".join(command), flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.perf_counter()
    if subprocess.run([sys.executable, *command], cwd=ROOT, env=env).returncode:
        raise tools.UserError(f"failed: python {' '.join(command)}")
    return time.perf_counter() - start


def train(row, args) -> float:
    """Train an RL row with rl.py unless its folder holds a finished run with the row's settings;
    returns the training time (of a finished run: the sum of its logged steps, evaluations left out)."""
    folder = ROOT / row["policy"]
    wanted = rl.get_args(row["train"][1:])
    if (folder / "run_config.json").is_file():
        saved = json.loads((folder / "run_config.json").read_text())
        differ = [k for k in ("alpha", "beta", "gamma", "seed", "ref_baseline") if saved.get(k) != getattr(wanted, k)]
        if differ:
            raise tools.UserError(f"{row['policy']} was run with other {', '.join(differ)} than the row "
                                  f"'{row['label']}'; pass another folder")
    if (folder / "config.json").is_file() and (folder / "summary.json").is_file():   # its logged step times
        return sum(json.loads(line).get("seconds", 0) for line in (folder / "metrics.jsonl").read_text().splitlines())
    resume = ["--resume"] if (folder / "checkpoint.pt").is_file() else []
    return run([*row["train"], *resume], args.threads)


def held_out(row, dataset, plan, args) -> dict:
    """The row's greedy episodes on the held-out prompts, scored by the default reward."""
    rl_args = rl.get_args([])
    # judged as rl.py's held-out evaluation judges: calibrated on the training categories' references
    toolbox = tools.Toolbox(tools.parse_tools_flag(row.get("tools", ALL_TOOLS)),
                            references=tools.reference_stats(dataset, dataset.train_categories))
    tasks = [tools.make_task(dataset, p) for p in plan]
    if row.get("method") == "fixed-prompt":
        scores = []
        for task in tasks:
            rng = np.random.default_rng([task.seed, tools.stable_seed("fixed-prompt")])
            image, _, _ = synthesize.fixed_prompt(task, toolbox, rng)
            scores.append(toolbox.judge.evaluate(task.image, image, task.kind, toolbox.entry(task))["score"])
        return {"final_qe": float(np.mean(scores)), "completed": 1.0, "attempts": 1.0, "episode_final_qe": scores}
    torch.manual_seed(args.seed)
    policy = tools.load_policy(row["policy"], seed=args.seed)
    policy.temperature = 0.0
    if hasattr(policy, "model"):
        policy.model.eval()
    records = []
    for i in range(0, len(tasks), 32):
        batch = tasks[i:i + 32]
        for task, r in zip(batch, tools.run_episodes(policy, batch, toolbox, rl_args.max_turns)):
            if r["final_score"] is None and r["final_image_index"] is not None and "quality_eval" not in toolbox.enabled:
                image = r["images"][r["final_image_index"] - 1]
                r["final_score"] = toolbox.judge.evaluate(task.image, image, task.kind, toolbox.entry(task))["score"]
            r.pop("images")
            records.append(r)
    parts = rl.score(records, rl_args)
    s = rl.summarize(records, parts)
    return {"reward": s["reward_mean"], "reward_se": s["reward_se"], "final_qe": s["final_qe"],
            "completed": s["completed"], "attempts": float(np.mean([len(r["attempts"]) for r in records])),
            "episode_rewards": [p["total"] for p in parts], "episode_final_qe": [r["final_score"] for r in records]}


def synthesize_and_evaluate(row, args) -> dict:
    """synthesize.py on the evaluation group, then evaluate.py on that one set."""
    out = Path(args.out)
    made = ["--method", "fixed-prompt"] if row.get("method") else ["--policy", row["policy"], "--tools", row["tools"]]
    seconds = run(["synthesize.py", *made, "--per-type", str(args.per_type), "--seed", str(args.seed),
                   "--out", str(out / "sets" / row["key"])], args.threads)
    command = ["evaluate.py", "--gen", str(out / "sets" / row["key"]), "--seed", str(args.seed),
               "--out", str(out / "eval" / row["key"])]
    seconds += run(command + (["--threads", str(args.threads)] if args.threads else []), args.threads)
    mean = json.loads((ROOT / out / "eval" / row["key"] / "results.json").read_text())["methods"][0]["mean"]
    return {"accuracy": mean["accuracy"], "pixel_ap": mean["pixel_ap"], "synth_eval_seconds": seconds}


def measure(row, dataset, plan, args) -> dict:
    """Train (RL rows), play the held-out episodes, synthesize and evaluate; each part saved as done."""
    path = ROOT / args.out / "rows" / f"{row['key']}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"label": row["label"]}

    def save():
        tools.write_json(path, result)

    if "train" in row and "train_seconds" not in result:
        result["train_seconds"] = train(row, args)
        save()
    if "final_qe" not in result:
        started = time.perf_counter()
        result.update(held_out(row, dataset, plan, args))
        result["held_out_seconds"] = time.perf_counter() - started
        save()
    if "accuracy" not in result:
        result.update(synthesize_and_evaluate(row, args))
        save()
    return result


# ---- the table ----------------------------------------------------------------------------------

def markdown(rows, results, args, n_prompts) -> str:
    sft = results.get("sft", {})
    lines = [f"Held-out: {n_prompts} greedy episodes (rl.py --seed {args.seed} --eval-per-type {args.eval_per_type}), "
             f"default reward; evaluation group: synthesize.py --per-type {args.per_type} --seed {args.seed}, "
             f"evaluate.py --seed {args.seed}.", "",
             "| row | held-out reward +- s.e. | vs SFT (paired) | final QE | vs SFT (paired) | completed | "
             "mean attempts | ResNet34 acc % | pixel AP % | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = results.get(row["key"], {})
        if "accuracy" not in r:
            lines.append(f"| {row['label']} | not measured yet |  |  |  |  |  |  |  |  |")
            continue
        reward = f"{r['reward']:.3f} +- {r['reward_se']:.3f}" if "reward" in r else "n/a"
        gain_r = gain_q = "-"
        if row["key"] != "sft" and "episode_final_qe" in sft:
            q, q_se = rl.paired_difference(sft["episode_final_qe"], r["episode_final_qe"])
            gain_q = f"{q:+.2f} +- {q_se:.2f}"
            if "episode_rewards" in r:
                g, g_se = rl.paired_difference(sft["episode_rewards"], r["episode_rewards"])
                gain_r = f"{g:+.3f} +- {g_se:.3f}"
        minutes = (r.get("train_seconds", 0) + r["held_out_seconds"] + r["synth_eval_seconds"]) / 60
        lines.append(f"| {row['label']} | {reward} | {gain_r} | {r['final_qe']:.2f} | {gain_q} | "
                     f"{r['completed']:.0%} | {r['attempts']:.2f} | {100 * r['accuracy']:.1f} | "
                     f"{100 * r['pixel_ap']:.1f} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = plan_rows(args)
    dataset = tools.load_dataset("toy")
    plan = rl.validation_prompts(dataset, args.eval_per_type, args.seed)
    wanted = set(tools.comma_list(args.rows, "--rows")) if args.rows else {row["key"] for row in rows}
    unknown = wanted - {row["key"] for row in rows}
    if unknown:
        raise tools.UserError(f"--rows: no row {', '.join(sorted(unknown))}; rows: {', '.join(r['key'] for r in rows)}")
    results, started = {}, time.perf_counter()
    for row in rows:
        if row["key"] in wanted:
            row_started = time.perf_counter()
            results[row["key"]] = measure(row, dataset, plan, args)
            print(f"row '{row['label']}': {time.perf_counter() - row_started:.0f} s this run", flush=True)
        elif (ROOT / args.out / "rows" / f"{row['key']}.json").is_file():   # measured by an earlier run
            results[row["key"]] = json.loads((ROOT / args.out / "rows" / f"{row['key']}.json").read_text())
    table = markdown(rows, results, args, len(plan))
    out = ROOT / args.out / "table.md"
    tools.write_atomic(out, table)
    print("\n" + table + f"\nwritten: {out} ({(time.perf_counter() - started) / 60:.1f} min this run)")


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
