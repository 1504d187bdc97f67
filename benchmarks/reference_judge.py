"""
benchmarks/reference_judge.py -- how often the measured judge passes a dataset's real test anomalies
against their clean counterparts, with and without the references' calibration. Prints a table.

    python benchmarks/reference_judge.py                                    # toy world, evaluation group
    python benchmarks/reference_judge.py --data mvtec --data-root /data/mvtec_anomaly_detection

Per (category, type): the references are the first third of its sorted anomalies, the judged ones
the other two thirds (docs/METHOD.md 7), each judged against its exemplar-fill clean counterpart.
A real defect is what the judge should accept; a judge that fails it cannot teach the agent.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tools   # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="toy", help="toy, mvtec or visa")
    p.add_argument("--data-root", default=None, help="the dataset's folder")
    p.add_argument("--categories", default=None, help="comma list; default: the evaluation group")
    args = p.parse_args()
    dataset = tools.load_dataset(args.data, args.data_root)
    categories = tools.comma_list(args.categories, "--categories") if args.categories else dataset.eval_categories
    calibrated = tools.Toolbox(references=tools.reference_stats(dataset, categories))
    plain = tools.Toolbox()
    print(f"{'category/type':28s} {'judged':>6s} {'pass, knowledge':>16s} {'pass, references':>17s}")
    totals = {"knowledge": [], "references": []}
    for cat in categories:
        for t in dataset.types(cat):
            passed = {"knowledge": [], "references": []}
            for anomaly in dataset.split(cat, t)[1]:
                image, mask = dataset.load_anomaly(anomaly)
                clean = tools.exemplar_fill(image, mask)
                task = tools.Task(id=anomaly.image.stem, category=cat, anomaly_type=t, image=clean,
                                  kind=dataset.kinds[cat], dataset=dataset.name)
                for name, box in (("knowledge", plain), ("references", calibrated)):
                    score = box.judge.evaluate(clean, image, task.kind, box.entry(task))["score"]
                    passed[name].append(score >= tools.PASS_SCORE)
            if passed["knowledge"]:
                print(f"{cat + '/' + t:28s} {len(passed['knowledge']):6d} {np.mean(passed['knowledge']):16.0%} "
                      f"{np.mean(passed['references']):17.0%}")
            for name in totals:
                totals[name] += passed[name]
    print(f"{'all':28s} {len(totals['knowledge']):6d} {np.mean(totals['knowledge']):16.1%} "
          f"{np.mean(totals['references']):17.1%}")


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
