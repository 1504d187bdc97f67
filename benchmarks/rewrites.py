"""
benchmarks/rewrites.py -- what a policy writes when it edits again after a check, sampled as rl.py's
groups sample it. For one (category, type) of the training group: --prompts training images, each
played --group-size times at --temperature; every image_gen prompt after the first of an episode is
a rewrite. Prints how often each look (the words between the type and the size) was written, with
the mean judge score it got, so one sees whether GRPO's groups ever hold the rewrite it should learn.

    python benchmarks/rewrites.py runs/sft --category pill --type contamination --threads 1
    python benchmarks/rewrites.py expert --category pill --type contamination    # the teacher's

A look GRPO never samples gets no advantage, however well it would score: that is what it shows.
"""
import argparse
import collections
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl      # noqa: E402
import tools   # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy", help="a policy folder (runs/sft, runs/rl) or expert")
    p.add_argument("--category", default="pill", help="a training-group category of the toy world")
    p.add_argument("--type", default="contamination", help="one of its anomaly types")
    p.add_argument("--prompts", type=int, default=8, help="training images (rl.py's prompts of the pair)")
    p.add_argument("--group-size", type=int, default=8, help="episodes per image, as rl.py's G")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (rl.py's for the tiny policy)")
    p.add_argument("--seed", type=int, default=0, help="which images, and the sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when the cores are shared)")
    return p.parse_args(argv)


def look(prompt) -> str:
    """The description of a local-edit prompt, "a dark brown irregular blob" in "... introduce a
    contamination: a dark brown irregular blob about 7 pixels across, ...": for counting only."""
    words = prompt.split(": ", 1)[-1]
    for stop in (" about ", ", ", ". "):
        words = words.split(stop, 1)[0]
    return words.rstrip(".")


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = tools.load_dataset("toy")
    if args.category not in dataset.train_categories:
        raise tools.UserError(f"--category {args.category}: expected one of {', '.join(dataset.train_categories)}")
    if args.type not in dataset.types(args.category):
        raise tools.UserError(f"--type {args.type}: {args.category} has {', '.join(dataset.types(args.category))}")
    rl_args = rl.get_args([])   # rl.py's tools and --max-turns
    toolbox = tools.make_toolbox(rl_args, dataset=dataset, categories=dataset.train_categories)
    torch.manual_seed(args.seed)
    policy = tools.load_policy(args.policy, seed=args.seed)
    policy.temperature = args.temperature
    pair = [p for p in rl.prompt_pool(dataset, args.seed)
            if (p["category"], p["anomaly_type"]) == (args.category, args.type)]
    prompts = random.Random(args.seed).sample(pair, min(args.prompts, len(pair)))   # RL prompts of the pair
    records = rl.rollout(policy, dataset, prompts, args.group_size, toolbox, rl_args.max_turns)
    scores = collections.defaultdict(list)
    for record in records:
        for attempt in record["attempts"][1:]:
            scores[look(attempt["prompt"])].append(attempt["score"])
    total = sum(len(s) for s in scores.values())
    print(f"\n{args.policy}: {total} rewrites in {len(records)} episodes of {args.category} {args.type} "
          f"(T {args.temperature:g})\n")
    print("| look | rewrites | share | mean score |")
    print("|---|---|---|---|")
    for words, got in sorted(scores.items(), key=lambda kv: -len(kv[1])):
        judged = [s for s in got if s is not None]
        mean = f"{sum(judged) / len(judged):.1f}" if judged else "not judged"
        print(f"| {words} | {len(got)} | {len(got) / total:.0%} | {mean} |")


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
