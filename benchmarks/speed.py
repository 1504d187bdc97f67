"""
benchmarks/speed.py -- times the walking skeleton against its targets and prints a table.

    python benchmarks/speed.py            # toy world generation and `python synthesize.py` defaults

Each stage runs in a fresh temporary folder as a subprocess, as a user would run it.
"""
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
    rows = [("toy world generation (8 categories, 128 px)", gen, 30),
            ("python synthesize.py, defaults (65 episodes)", synth, 120)]
    print(f"{'what':48s} {'seconds':>8s} {'target':>8s}  ok")
    for name, seconds, target in rows:
        print(f"{name:48s} {seconds:8.1f} {target:8d}  {'yes' if seconds < target else 'NO'}")
    print(out.strip().splitlines()[-2])


if __name__ == "__main__":
    main()
