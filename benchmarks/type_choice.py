"""
benchmarks/type_choice.py -- does a policy copy the anomaly type it is asked for? For each of rl.py's
held-out prompts, the policy's own greedy first turn (the prompt_gen call), scored with its
anomaly_type argument set to each type of the category in turn: the probability of the right one
among them (the rest of the turn fixed), averaged per (category, type). Prints a table.

    python benchmarks/type_choice.py runs/sft runs/rl --eval-per-type 2 --threads 1

A policy that reads the type from the task puts nearly all the probability on it; one that only
knows the item spreads it evenly, one over the number of the category's types (the "guess" column).
A first turn that is not a prompt_gen call with an anomaly_type is counted, not scored.
"""
import argparse
import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl      # noqa: E402
import tools   # noqa: E402

TYPE_ARGUMENT = re.compile(r'"anomaly_type": "[^"]*"')


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policies", nargs="+", help="policy folders (runs/sft, runs/rl, ...)")
    p.add_argument("--eval-per-type", type=int, default=2, help="prompts per (training category, type), as in rl.py")
    p.add_argument("--seed", type=int, default=0, help="rl.py's --seed (which test images)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when the cores are shared)")
    return p.parse_args(argv)


def right_type_probability(policy, first_turn, category_types, right) -> float:
    """P(right | the turn with its type argument free), from the turn's log-likelihood with each type."""
    variants = []
    for t in category_types:
        conversation = copy.deepcopy(first_turn)
        conversation[-1]["content"] = TYPE_ARGUMENT.sub(f'"anomaly_type": {json.dumps(t)}', conversation[-1]["content"])
        variants.append(conversation)
    with torch.no_grad():
        logp, mask = policy.token_logprobs(policy.encode(variants), 1.0)
    return float(torch.softmax((logp * mask).sum(1), 0)[category_types.index(right)])


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = tools.load_dataset("toy", None, None)
    plan = rl.validation_prompts(dataset, args.eval_per_type, args.seed)
    toolbox = tools.make_toolbox(rl.get_args([]), tools.parse_tools_flag("PG,IG,QE,KR,MG"), dataset=dataset,
                                 categories=dataset.train_categories)
    pairs = list(dict.fromkeys((p["category"], p["anomaly_type"]) for p in plan))   # in plan order
    columns = {}
    for name in args.policies:
        policy = tools.load_policy(name, seed=args.seed, device="cpu")
        policy.temperature = 0.0
        records = tools.run_episodes(policy, [tools.make_task(dataset, p) for p in plan], toolbox, max_turns=1)
        found, unscored = {}, 0
        for p, record in zip(plan, records):
            first_turn = record["messages"][:3]
            if len(first_turn) < 3 or not TYPE_ARGUMENT.search(str(first_turn[-1]["content"])):
                unscored += 1
                continue
            types = [t.replace("_", " ") for t in dataset.types(p["category"])]
            found.setdefault((p["category"], p["anomaly_type"]), []).append(
                right_type_probability(policy, first_turn, types, p["anomaly_type"].replace("_", " ")))
        columns[name] = (found, unscored)
    print("| category | type | guess | " + " | ".join(args.policies) + " |")
    print("|---|---|---|" + "---|" * len(args.policies))
    for cat, t in pairs:
        cells = [f"{np.mean(columns[n][0][(cat, t)]):.2f}" if (cat, t) in columns[n][0] else "-" for n in args.policies]
        print(f"| {cat} | {t} | {1 / len(dataset.types(cat)):.2f} | " + " | ".join(cells) + " |")
    scored = [[v for vs in columns[n][0].values() for v in vs] for n in args.policies]
    print("| all | | | " + " | ".join(f"{np.mean(v):.2f}" if v else "-" for v in scored) + " |")
    for n in args.policies:
        if columns[n][1]:
            print(f"{n}: {columns[n][1]} of {len(plan)} first turns had no anomaly_type to score")


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
