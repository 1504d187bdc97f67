"""
benchmarks/heldout.py -- rl.py's held-out prompts played by several policies, greedy (what rl.py
reports) and sampled at the training temperature (what GRPO optimizes). Prints a table.

    python benchmarks/heldout.py runs/sft runs/rl                      # 120 prompts, greedy + 2 samples each
    python benchmarks/heldout.py runs/sft runs/rl --samples 4 --threads 1
    python benchmarks/heldout.py openai:http://localhost:8000/v1#runs/rl   # served: vllm serve runs/rl
    python benchmarks/heldout.py expert runs/sft --samples 0 --per-pair    # where SFT and its teacher differ

The prompts are rl.py's validation_prompts (the training categories' test normal images) with the
same --seed and --eval-per-type, so the greedy column matches rl.py's eval_ numbers. Each reward
has its standard error, and every policy after the first is compared with the first (runs/sft) on
the same prompts and decoding: the paired difference of reward and final QE, with its standard
error (much smaller than the two means' own, since the prompts' difficulty cancels).
--per-pair adds a table of each policy's greedy reward per (category, type), the mean of that
pair's held-out prompts: a mean that matches another policy's can hide pairs where they differ.
"""
import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl      # noqa: E402
import tools   # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policies", nargs="+", help="policy folders (runs/sft, runs/rl, ...) or served policies (openai:<base-url>#<model>)")
    p.add_argument("--samples", type=int, default=2, help="sampled episodes per prompt (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (rl.py's for the tiny policy)")
    p.add_argument("--eval-per-type", type=int, default=8, help="prompts per (training category, type), as in rl.py")
    p.add_argument("--seed", type=int, default=0, help="rl.py's --seed (the prompts) and the sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when the cores are shared)")
    p.add_argument("--per-pair", action="store_true", help="also print each policy's greedy reward per (category, type)")
    tools.add_backend_flags(p)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = tools.load_dataset("toy")
    plan = rl.validation_prompts(dataset, args.eval_per_type, args.seed)
    toolbox = tools.make_toolbox(args, dataset=dataset, categories=dataset.train_categories)
    rl_args = rl.get_args([])   # rl.py's reward weights and --max-turns
    rows, first = [], {}
    for path in args.policies:
        started = time.time()
        torch.manual_seed(args.seed)
        policy = tools.load_policy(path, seed=args.seed)
        runs = [("greedy", rl.evaluate(policy, dataset, plan, toolbox, rl_args))]
        if args.samples:
            copies = [dict(p, id=f"{p['id']}/{j}") for p in plan for j in range(args.samples)]
            runs.append((f"T={args.temperature:g} x{args.samples}",
                         rl.evaluate(policy, dataset, copies, toolbox, rl_args, args.temperature)))
        for how, s in runs:
            first.setdefault(how, s)
            rows.append((path, how, s, rl.paired_gain(first[how], s)))
        print(f"{path}: {time.time() - started:.0f} s", file=sys.stderr)
    print(f"\n{len(plan)} held-out prompts (rl.py --seed {args.seed} --eval-per-type {args.eval_per_type})\n")
    print(f"| policy | decoding | reward +- s.e. | vs {args.policies[0]} (paired) | R_task | R_ref | R_beh | "
          f"final QE | vs {args.policies[0]} (paired) | completed | well-formed turns |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path, how, s, g in rows:
        print(f"| {path} | {how} | {s['eval_reward_mean']:.3f} +- {s['eval_reward_se']:.3f} | "
              f"{g['eval_reward_gain']:+.3f} +- {g['eval_reward_gain_se']:.3f} | {s['eval_task_mean']:.3f} | "
              f"{s['eval_reflection_mean']:.3f} | {s['eval_behavior_mean']:.3f} | {s['eval_final_qe']:.2f} | "
              f"{g['eval_final_qe_gain']:+.2f} +- {g['eval_final_qe_gain_se']:.2f} | "
              f"{s['eval_completed']:.0%} | {s['eval_well_formed']:.1%} |")
    if args.per_pair:
        print_per_pair(plan, [(path, s) for path, how, s, _ in rows if how == "greedy"])


def print_per_pair(plan, greedy_runs):
    """One row per (category, type): each policy's mean greedy reward over that pair's prompts."""
    print("\n| category / type | " + " | ".join(path for path, _ in greedy_runs) + " |")
    print("|---|" + "---|" * len(greedy_runs))
    pairs = collections.defaultdict(list)   # in plan order: the training categories, their types
    for i, p in enumerate(plan):
        pairs[f"{p['category']} / {p['anomaly_type']}"].append(i)
    for pair, episodes in pairs.items():
        means = [sum(s["eval_episode_rewards"][i] for i in episodes) / len(episodes) for _, s in greedy_runs]
        print(f"| {pair} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
