"""
benchmarks/compare.py -- the whole comparison on the toy world, timed: synthesize a set with the
agent (the expert, and each trained policy folder that exists: runs/rl by default) and with the
three baselines, then one evaluate.py run on all of them. Prints every command with its wall time,
then evaluate.py's table.

    python benchmarks/compare.py                         # writes runs/compare/<set>/ and runs/compare/eval/
    python benchmarks/compare.py --threads 1             # when another job shares the CPU cores

Each stage runs as a subprocess from the repository root, as a user would run it; a set that is
already there is resumed by synthesize.py (same settings), so a rerun only re-evaluates.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare", help="folder for the sets and the evaluation")
    p.add_argument("--per-type", type=int, default=10, help="samples per (category, type) of every set")
    p.add_argument("--policies", default="runs/rl", help="comma list of trained policy folders to add as agents, where they exist")
    p.add_argument("--threads", type=int, default=None, help="passed to evaluate.py (1 when the cores are shared)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthesis and evaluation")
    return p.parse_args(argv)


def timed(command) -> float:
    print("$ python " + " ".join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): python {' '.join(command)}")
    seconds = time.perf_counter() - start
    print(result.stdout.strip().splitlines()[-2 if "gallery" in result.stdout else -1] if result.stdout.strip() else "")
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def main():
    args = get_args()
    out = Path(args.out)
    common = ["--per-type", str(args.per_type), "--seed", str(args.seed)]
    sets = {"agent": ["--method", "agent"]}
    for policy in filter(None, (p.strip() for p in args.policies.split(","))):
        if (ROOT / policy / "config.json").is_file():   # a saved model, not just a checkpoint
            sets[f"agent-{Path(policy).name}"] = ["--policy", policy]
        else:
            print(f"(no trained model in {policy}: its agent is left out)")
    sets.update({m: ["--method", m] for m in ("fixed-prompt", "draem", "cutpaste")})
    times = {}
    for name, flags in sets.items():
        times[f"synthesize {name}"] = timed(["synthesize.py", *flags, *common, "--out", str(out / name)])
    evaluate = ["evaluate.py", "--gen", *(str(out / name) for name in sets), "--seed", str(args.seed),
                "--out", str(out / "eval")]
    if args.threads:
        evaluate += ["--threads", str(args.threads)]
    start = time.perf_counter()
    print("$ python " + " ".join(evaluate), flush=True)
    if subprocess.run([sys.executable, *evaluate], cwd=ROOT).returncode:
        sys.exit("evaluate.py failed")
    times["evaluate.py"] = time.perf_counter() - start
    print(f"\n{'step':32s} {'seconds':>8s}")
    for step, seconds in times.items():
        print(f"{step:32s} {seconds:8.0f}")
    print(f"{'total':32s} {sum(times.values()):8.0f}  ({sum(times.values()) / 60:.1f} min)")


if __name__ == "__main__":
    main()
