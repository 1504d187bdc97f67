"""
docs/real_photos.py -- the README's picture of what the offline backends do on real photos.

    python docs/real_photos.py --data-root /data/mvtec_anomaly_detection --categories screw,cable

Runs synthesize.py (the expert agent with the offline painter and judge) on a few normal photos of
an MVTec-AD layout folder, then draws one row per sample: the normal photo, the final image, and
the mask outlined in red on it, labelled with the type and the judge's score. Writes a JPEG.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tools  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--data-root", required=True, help="an MVTec-AD layout folder with normal images")
    p.add_argument("--categories", default="screw,cable", help="comma list")
    p.add_argument("--types", default="scratch_head,thread_side,poke_insulation,cut_outer_insulation",
                   help="comma list of anomaly types")
    p.add_argument("--tile", type=int, default=160, help="side of one picture in pixels")
    p.add_argument("--out", default="docs/real_photos.jpg", help="the JPEG to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthesis run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, str(ROOT / "synthesize.py"), "--data", "mvtec", "--data-root",
                              args.data_root, "--categories", args.categories, "--types", args.types,
                              "--per-type", "1", "--seed", str(args.seed), "--out", tmp],
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(run.stderr.strip().splitlines()[-1])
        records = [json.loads(line) for line in (Path(tmp) / "trajectories.jsonl").read_text().splitlines()]
        rows = []
        for r in sorted(records, key=lambda r: r["id"]):
            if not r["final_image"]:
                continue
            normal = tools.load_image(Path(tmp) / r["step_images"][0], args.tile)
            final = tools.load_image(Path(tmp) / r["final_image"], args.tile)
            mask = tools.load_mask(Path(tmp) / r["mask"], args.tile)
            outlined = final.copy()
            outlined[mask & ~ndimage.binary_erosion(mask, iterations=2)] = (255, 0, 0)
            row = Image.fromarray(np.concatenate([normal, final, outlined], axis=1))
            ImageDraw.Draw(row).text((4, 4), f"{r['anomaly_type']}  QE {r['final_score']:g}/10", fill=(255, 255, 0))
            rows.append(np.asarray(row))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out, quality=80)
    print(f"{len(rows)} rows (normal | final image | mask outlined) in {args.out}")


if __name__ == "__main__":
    main()
