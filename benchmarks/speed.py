"""
benchmarks/speed.py -- times the walking skeleton against its targets and prints a table.

    python benchmarks/speed.py            # toy world generation and `python synthesize.py` defaults

Each stage runs in a fresh temporary folder as a subprocess, as a user would run it. When the tiny
policy is trained (runs/sft), synthesis with it is timed too, with its episodes a second (the
whole command: loading included); benchmarks/rollout.py times its rollouts in detail.
"""
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(*args):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{result.stderr}")
    return time.perf_counter() - start, result.stdout


def main():
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "toy"
        gen, _ = timed("-c", f"import tools; tools.load_dataset('toy', {str(world)!r})")
        synth, out = timed("synthesize.py", "--data-root", str(world), "--out", str(Path(tmp) / "synth"))
        rows = [("toy world generation (8 categories, 128 px)", gen, None, 30),
                ("python synthesize.py, defaults (65 episodes)", synth, episodes(out), 120)]
        if (ROOT / "runs" / "sft" / "config.json").is_file():
            policy, policy_out = timed("synthesize.py", "--data-root", str(world), "--policy", "runs/sft",
                                       "--out", str(Path(tmp) / "synth-sft"))
            rows.append((f"python synthesize.py --policy runs/sft ({episodes(policy_out)} episodes)", policy,
                         episodes(policy_out), None))
    print(f"{'what':54s} {'seconds':>8s} {'episodes/s':>10s} {'target':>7s}  ok")
    for name, seconds, count, target in rows:
        rate = f"{count / seconds:10.2f}" if count else f"{'':10s}"
        print(f"{name:54s} {seconds:8.1f} {rate} " +
              (f"{target:7d}  {'yes' if seconds < target else 'NO'}" if target else f"{'-':>7s}  -"))
    print(f"\nexpert: {out.strip().splitlines()[-2]}")
    if len(rows) == 3:
        print(f"runs/sft: {policy_out.strip().splitlines()[-2]}")
    else:
        print("(no runs/sft: python build_trajectories.py && python sft.py trains the tiny policy, timed here too)")


def episodes(stdout) -> int:
    """The number of episodes synthesize.py's summary line counts."""
    return int(re.search(r"^(\d+) episodes \|", stdout, re.M).group(1))


if __name__ == "__main__":
    main()
