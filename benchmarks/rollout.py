"""
benchmarks/rollout.py -- times rl.py's rollout of the same prompts at G = 1, 2, 4 and 8 episodes a
prompt, and the GRPO update on each rollout's groups, and prints a table.

    python benchmarks/rollout.py --threads 1                          # runs/sft, 4 prompts from rl.py's pool
    python benchmarks/rollout.py --threads 1 --compare-with 3bb38fb   # and the code of that revision, side by side
    python benchmarks/rollout.py --threads 1 --prompts 1              # its first prompt alone

A rollout is rl.py's, on the CPU: --prompts prompts (a seeded draw from rl.py's prompt pool, the
same for every code compared), each played G times at the policy's rl.py temperature against the
offline tools, every live episode answered by one batched policy call a turn. The update is
rl.update on the rollout's groups (none at G = 1: a group of one carries no signal). Each (code, G)
runs in a fresh process that first plays one warm-up turn, so one-time costs stay out of the
timings; with --compare-with the two codes take turns, so a busy machine slows both alike, and
--repeats N plays each rollout N times (the same seed: the same episodes) and keeps the fastest.
Columns: episodes a second and reply tokens (the tokenized assistant turns, each with its end token)
a second of the rollout, and the shares of rollout + update spent in generation (the model),
encoding (rendering conversations, the image processor), the tools (the rest of the rollout) and the
update. Below the table: the G = 8 rollout's time over the G = 1 rollout's, and with --compare-with
the episodes a second at G = 8 over those of the older code.
"""
import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUP_SIZES = (1, 2, 4, 8)
# what --compare-with takes from the revision: the shared modules, and the files they read
CODE = ("tools.py", "toy_world.py", "rewards.py", "rl.py", "knowledge.json")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="runs/sft", help="the policy folder (sft.py's output)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rollout (as rl.py's --prompts-per-step)")
    p.add_argument("--compare-with", default=None, help="a git revision whose code is timed too, side by side")
    p.add_argument("--repeats", type=int, default=1, help="plays of each rollout (same episodes); the fastest counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when the cores are shared)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the sampling")
    p.add_argument("--worker", nargs=2, metavar=("CODE", "G"), help=argparse.SUPPRESS)   # one timing, as JSON
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.worker:
        return print(json.dumps(time_one(args, Path(args.worker[0]), int(args.worker[1]))))
    if not (Path(args.policy) / "config.json").is_file():
        sys.exit(f"error: --policy {args.policy}: no trained policy there "
                 "(python build_trajectories.py && python sft.py writes runs/sft)")
    for flag in ("prompts", "repeats"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} must be at least 1, not {getattr(args, flag)}")
    sys.path.insert(0, str(ROOT))
    import tools
    tools.load_dataset("toy")   # generated here once, if it is not there yet, for every worker
    with tempfile.TemporaryDirectory() as tmp:
        codes = [("now", ROOT)]
        if args.compare_with:
            codes.insert(0, (args.compare_with, export_revision(args.compare_with, Path(tmp))))
        rows = [(name, g, run_worker(args, name, code, g)) for g in GROUP_SIZES for name, code in codes]
    print_table(args, rows)


def export_revision(revision, folder) -> Path:
    """The revision's CODE files in folder, to be imported from there instead of the checkout's."""
    for name in CODE:
        shown = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=ROOT, capture_output=True)
        if shown.returncode:
            sys.exit(f"error: --compare-with {revision}: no {name} at that git revision of {ROOT}")
        (folder / name).write_bytes(shown.stdout)
    return folder


def run_worker(args, name, code, group_size) -> dict:
    command = [sys.executable, __file__, "--worker", str(code), str(group_size),
               "--policy", str(Path(args.policy).resolve()), "--prompts", str(args.prompts),
               "--seed", str(args.seed), "--repeats", str(args.repeats)]
    env = dict(os.environ)
    if args.threads:
        command += ["--threads", str(args.threads)]
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"G={group_size}, code {name}", file=sys.stderr, flush=True)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the timing of G={group_size} with code {name} failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class Stopwatch:
    """Wraps a callable and adds the seconds its calls take to .seconds."""

    def __init__(self, function):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):   # the image processor's settings read through the wrapper
        return getattr(self.function, name)


def time_one(args, code, group_size) -> dict:
    """One rollout at this G and the update on its groups, with the modules of `code`."""
    sys.path.insert(0, str(code))
    import torch
    import rl
    import tools
    if args.threads:
        torch.set_num_threads(args.threads)
    rl_args = rl.get_args(["--policy", args.policy, "--seed", str(args.seed), "--device", "cpu",
                           "--data-root", str(ROOT / "data" / "toy" / "128px-seed0")])
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dataset = tools.load_dataset("toy", rl_args.data_root)
    toolbox = tools.make_toolbox(rl_args, tools.parse_tools_flag(rl_args.tools))
    prompts = random.Random(tools.stable_seed(args.seed, 0)).sample(rl.prompt_pool(dataset, args.seed), args.prompts)
    policy, reference, _, lr = rl.load_models(rl_args)
    warm_up = tools.Episode(tools.make_task(dataset, prompts[0]), toolbox)
    policy.act([warm_up.messages])

    plays = []
    act, render, processor = policy.act, policy._render, policy.image_processor
    for _ in range(args.repeats):   # the same seed: the same episodes
        torch.manual_seed(args.seed)
        policy.act, policy._render, policy.image_processor = Stopwatch(act), Stopwatch(render), Stopwatch(processor)
        start = time.perf_counter()
        records = rl.rollout(policy, dataset, prompts, group_size, toolbox, rl_args.max_turns)
        plays.append({"rollout": time.perf_counter() - start, "act": policy.act.seconds,
                      "encoding": policy._render.seconds + policy.image_processor.seconds})
    fastest = min(plays, key=lambda play: play["rollout"])

    parts = rl.score(records, rl_args)
    advantages, keep = rl.grpo_advantages([p["total"] for p in parts], group_size,
                                          [not rl.judge_failed(r) for r in records])
    buffer = [(r["messages"], float(a)) for r, a, k in zip(records, advantages, keep) if k]
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rl.lr_at(0, lr, rl_args), weight_decay=0.0)
    start = time.perf_counter()
    if buffer:
        rl.update(policy, reference, optimizer, params, buffer, rl_args, contextlib.nullcontext)
    update = time.perf_counter() - start
    replies = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
    tokens = sum(len(policy.tokenizer(reply)["input_ids"]) + 1 for reply in replies)
    return {"episodes": len(records), "turns": len(replies), "tokens": tokens, "rollout": fastest["rollout"],
            "generation": fastest["act"] - fastest["encoding"], "encoding": fastest["encoding"],
            "tools": fastest["rollout"] - fastest["act"], "update": update, "kept": len(buffer)}


def print_table(args, rows):
    print(f"\n{args.policy}, {args.prompts} prompts (rl.py --seed {args.seed}), torch threads "
          f"{args.threads or 'default'}\n")
    print("| code | G | episodes | turns | rollout s | episodes/s | reply tokens | tokens/s | generation | "
          "encoding | tools | update s (episodes) | update |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, g, t in rows:
        total = t["rollout"] + t["update"]
        share = {k: f"{100 * t[k] / total:.0f}%" for k in ("generation", "encoding", "tools", "update")}
        print(f"| {name} | {g} | {t['episodes']} | {t['turns']} | {t['rollout']:.1f} | "
              f"{t['episodes'] / t['rollout']:.2f} | {t['tokens']} | {t['tokens'] / t['rollout']:.0f} | "
              f"{share['generation']} | {share['encoding']} | {share['tools']} | "
              f"{t['update']:.1f} ({t['kept']}) | {share['update']} |")
    now = {g: t for name, g, t in rows if name == "now"}
    ratio = now[8]["rollout"] / now[1]["rollout"]
    print(f"\nrollout at G=8 / rollout at G=1 (same prompts): {ratio:.2f}x  (target below 3x: "
          f"{'yes' if ratio < 3 else 'NO'})")
    if args.compare_with:
        before = next(t for name, g, t in rows if name == args.compare_with and g == 8)
        gain = (now[8]["episodes"] / now[8]["rollout"]) / (before["episodes"] / before["rollout"])
        print(f"episodes/s at G=8, now / {args.compare_with}: {gain:.2f}x  (target at least 2x: "
              f"{'yes' if gain >= 2 else 'NO'})")


if __name__ == "__main__":
    main()
