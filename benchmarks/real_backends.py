"""
benchmarks/real_backends.py -- seconds per prompt, per edit and per judgement of the tools' backends.

    python benchmarks/real_backends.py                                          # the offline backends
    python benchmarks/real_backends.py --ig diffusers:runs/tiny-inpaint --ig-steps 2 --ig-size 32
    python benchmarks/real_backends.py --pg openai:http://localhost:8000/v1#Qwen/Qwen3-VL-8B-Instruct \\
        --qe openai:http://localhost:8000/v1#Qwen/Qwen3-VL-8B-Instruct --data mvtec --data-root /data/mvtec

No agent plays: on --calls normal images of the evaluation group, the prompt writer writes a prompt,
the editor edits with it and the judge judges the edit, each call timed (a failed prompt is replaced by
the offline writer's, a failed edit skips its judgement). The first call of each backend is timed
apart: it includes loading and warm-up. Prints a table.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tools   # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="toy", help="toy, mvtec or visa")
    p.add_argument("--data-root", default=None, help="its folder")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (toy 128, real 256)")
    p.add_argument("--calls", type=int, default=6, help="calls of each backend (the first one is timed apart)")
    p.add_argument("--seed", type=int, default=0, help="which images and types")
    tools.add_backend_flags(p)
    return p.parse_args(argv)


def timed(call, times, failures):
    start = time.perf_counter()
    try:
        return call()
    except tools.ToolError as e:
        failures.append(str(e))
        return None
    finally:
        times.append(time.perf_counter() - start)


def main(argv=None):
    args = get_args(argv)
    dataset = tools.load_dataset(args.data, args.data_root, args.size)
    plan = tools.plan_tasks(dataset, per_type=1, seed=args.seed)
    plan = [plan[i % len(plan)] for i in range(args.calls)]
    box = tools.make_toolbox(args)
    times = {"prompt (PG)": [], "edit (IG)": [], "judgement (QE)": []}
    failed = {name: [] for name in times}
    for planned in plan:
        task = tools.make_task(dataset, planned)
        entry, rng = box.entry(task), np.random.default_rng(task.seed)
        prompt = timed(lambda: box.prompt_writer.write(task.image, entry, rng), times["prompt (PG)"],
                       failed["prompt (PG)"]) or tools.OfflinePromptWriter().write(task.image, entry, rng)
        edited = timed(lambda: box.editor.edit(task.image, prompt, task.kind, rng), times["edit (IG)"], failed["edit (IG)"])
        if edited is not None:
            timed(lambda: box.judge.evaluate(task.image, edited, task.kind, entry), times["judgement (QE)"],
                  failed["judgement (QE)"])
    specs = {"prompt (PG)": args.pg, "edit (IG)": args.ig, "judgement (QE)": args.qe}
    print(f"\n{args.calls} calls each on {dataset.name} images of {dataset.image_size} px\n")
    print("| call | backend | first call, s | later calls, mean s | failed |")
    print("|---|---|---|---|---|")
    for name, spent in times.items():
        later = f"{np.mean(spent[1:]):.3f}" if len(spent) > 1 else "n/a"
        first = f"{spent[0]:.3f}" if spent else "n/a"
        print(f"| {name} | {specs[name]} | {first} | {later} | {len(failed[name])} of {len(spent)} |")
    for name, errors in failed.items():
        if errors:
            print(f"{name}, last failure: {errors[-1]}")


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
