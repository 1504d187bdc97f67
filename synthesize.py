"""
synthesize.py -- run the agent on normal images and write the anomalies it synthesizes.

    python synthesize.py                                  # expert agent, toy world, eval categories
    python synthesize.py --data mvtec --data-root /data/mvtec_anomaly_detection --per-type 30
    python synthesize.py --tools PG,IG,QE,MG --out runs/synth-no-kr   # ablation: no knowledge

For every (category, anomaly type) it plays --per-type episodes, each on a normal training image,
through the shared episode runner (tools.run_episodes), and writes:

    OUT/<category>/<type>/image/<i>.png       the final anomaly image (the layout evaluate.py reads)
    OUT/<category>/<type>/mask/<i>.png        its mask
    OUT/<category>/<type>/steps/<i>/<k>.png   every image of the episode, k = the agent's numbering
    OUT/trajectories.jsonl                    one trajectory per line, images by relative path
    OUT/index.html                            a gallery: normal, anomaly, mask and the agent's turns
    OUT/overview.png                          one row per type: normal, then anomalies and outlines
    OUT/config.json, OUT/summary.json         the settings, and the run's rates

Rerunning with the same settings resumes: finished samples are kept and only missing ones are made.
The policy is the scripted expert by default, or a trained model (--policy runs/sft or runs/rl).
Simplifies: the offline tool backends (procedural painter, measured judge) stand in for the paper's
Gemini models.
"""
import argparse
import html
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

import tools


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default="toy", help="toy (built in, generated on first use), mvtec or visa")
    data.add_argument("--data-root", default=None, help="the dataset's folder (for toy: where to cache it)")
    data.add_argument("--size", type=int, default=None, help="image side in pixels (toy 128, real 256)")
    data.add_argument("--categories", default=None, help="comma list; default: the evaluation group")
    data.add_argument("--types", default=None, help="comma list of anomaly types; default: all")
    data.add_argument("--per-type", type=int, default=5, help="samples per (category, type)")
    agent = p.add_argument_group("agent")
    agent.add_argument("--policy", default="expert", help="expert (scripted), a trained model folder (runs/sft) or a Hugging Face id")
    agent.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of a model policy (0: greedy)")
    agent.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where a model policy runs")
    agent.add_argument("--tools", default="PG,IG,QE,KR,MG", help="tools the agent may call (ablations)")
    agent.add_argument("--max-turns", type=int, default=10, help="turns per episode (paper: 10)")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/synth", help="output folder; an existing one is resumed")
    run.add_argument("--seed", type=int, default=0, help="seed of the agent and the tools")
    run.add_argument("--batch-size", type=int, default=16, help="episodes played side by side")
    return p.parse_args(argv)


# settings that change what a sample looks like: a resumed run must share them
RUN_SETTINGS = ("data", "data_root", "size", "policy", "temperature", "tools", "max_turns", "seed")


def prepare_out(out, args, dataset) -> dict:
    """Create or resume OUT; returns the finished records by id. Never overwrites another run."""
    config = {k: getattr(args, k) for k in RUN_SETTINGS}
    config.update(data_root=str(dataset.root.resolve()), size=dataset.image_size)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise tools.UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    config_path = out / "config.json"
    if config_path.exists():
        try:
            old = json.loads(config_path.read_text())
        except ValueError:
            raise tools.UserError(f"{config_path} is corrupt; pass another --out") from None
        diff = [f"--{k.replace('_', '-')} {old.get(k)} -> {config[k]}" for k in RUN_SETTINGS
                if old.get(k) != config[k]]
        if diff:
            raise tools.UserError(f"{out} holds a run made with other settings ({'; '.join(diff)}); "
                                  "pass another --out, or delete it")
    elif any(out.iterdir()):
        raise tools.UserError(f"{out} exists and is not a synthesize.py output; pass another --out")
    config_path.write_text(json.dumps(config, indent=1))
    done, lines = {}, []
    log = out / "trajectories.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:   # a line cut short by a kill: that sample is redone
                continue
            done[record["id"]] = record
            lines.append(line)
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(log)
    return done


def save_record(record, out, toolbox) -> dict:
    """Write the episode's images and return its JSON record, images replaced by relative paths."""
    cat, t, i = record["id"].split("/")
    base = Path(cat) / t
    final, mask_index = record["final_image_index"], record["mask_index"]
    record["final_image"] = record["mask"] = None
    if final is not None:
        record["final_image"] = str(base / "image" / f"{i}.png")
        tools.save_png(record["images"][final - 1], out / record["final_image"])
        if mask_index is not None:
            mask = record["images"][mask_index - 1] > 0
        else:   # the mask tool was switched off: measure the change afterwards, outside the agent
            mask = toolbox.segmenter.segment(record["images"][0], record["images"][final - 1])
        record["mask"] = str(base / "mask" / f"{i}.png")
        tools.save_png(mask, out / record["mask"])
    record["step_images"] = tools.save_episode_images(record["messages"], record.pop("images"), out,
                                                      base / "steps" / i)
    return record


def write_gallery(out, records) -> None:
    """index.html: per sample the normal image, the anomaly, the mask and the agent's turns."""
    def img(path, title=""):
        return f'<figure><img src="{html.escape(path)}"><figcaption>{html.escape(title)}</figcaption></figure>'

    rows, current = [], None
    for r in sorted(records, key=lambda r: r["id"]):
        group = f"{r['category']} / {r['anomaly_type']}"
        if group != current:
            rows.append(f"<h2>{html.escape(group)}</h2>")
            current = group
        scores = ", ".join(f"{s:g}" for s in r["qe_scores"]) or "none"
        figures = [img(r["step_images"][0], "normal (image 1)")]
        figures += [img(r["step_images"][a["image_index"] - 1],
                        f"attempt {n}: {a['score'] if a['score'] is not None else '?'}/10")
                    for n, a in enumerate(r["attempts"], 1)]
        if r["final_image"]:
            figures += [img(r["final_image"], f"final: image {r['final_image_index']}"),
                        img(r["mask"], "mask")]
        turns = []
        for m in r["messages"][2:]:
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            body = "".join(f'<img class="small" src="{html.escape(p["image"])}">' if p["type"] == "image"
                           else f"<pre>{html.escape(p['text'])}</pre>" for p in parts)
            turns.append(f'<div class="{m["role"]}"><b>{m["role"]}</b>{body}</div>')
        rows.append(f'<section><h3>{html.escape(r["id"])} &middot; QE scores: {scores} &middot; '
                    f'{r["num_turns"]} turns</h3><div class="row">{"".join(figures)}</div>'
                    f'<details><summary>the agent\'s turns</summary>{"".join(turns)}</details></section>')
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>AnomalyAgent samples</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} .row{{display:flex;flex-wrap:wrap;gap:.5em}}
figure{{margin:0}} figure img{{width:160px;image-rendering:pixelated}} figcaption{{font-size:.8em}}
img.small{{width:96px;image-rendering:pixelated}} pre{{white-space:pre-wrap;margin:.2em 0}}
.assistant{{background:#eef4ff;padding:.3em}} .tool{{background:#f4f4f4;padding:.3em}}</style></head>
<body><h1>AnomalyAgent: {len(records)} synthesized samples</h1>{"".join(rows)}</body></html>"""
    tmp = out / "index.html.tmp"
    tmp.write_text(page)
    tmp.replace(out / "index.html")


def write_overview(out, records, per_row=4) -> None:
    """overview.png: one row per (category, type): a normal image, then anomalies with their masks
    drawn as red outlines. A picture to glance at, or to put in a paper or a README."""
    rows = {}
    for r in sorted(records, key=lambda r: r["id"]):
        if r["final_image"]:
            rows.setdefault((r["category"], r["anomaly_type"]), []).append(r)
    if not rows:
        return
    tiles = []
    for group in rows.values():
        tile = [tools.load_image(out / group[0]["step_images"][0])]
        for r in group[:per_row]:
            image = tools.load_image(out / r["final_image"])
            outlined = image.copy()
            mask = tools.load_mask(out / r["mask"])
            outlined[mask & ~ndimage.binary_erosion(mask)] = (255, 0, 0)
            tile += [image, outlined]
        side = tile[0].shape[0]
        blank = np.full((side, side, 3), 255, np.uint8)
        tiles.append(np.concatenate(tile + [blank] * (1 + 2 * per_row - len(tile)), axis=1))
    tools.save_png(np.concatenate(tiles, axis=0), out / "overview.png")


def main(argv=None):
    args = get_args(argv)
    args.tools = ",".join(tools.parse_tools_flag(args.tools))
    for flag in ("per_type", "max_turns", "batch_size"):
        if getattr(args, flag) < 1:
            raise tools.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    dataset = tools.load_dataset(args.data, args.data_root, args.size)
    out = Path(args.out)
    tasks = tools.plan_tasks(dataset, args.categories, args.types, args.per_type, args.seed)
    done = prepare_out(out, args, dataset)
    todo = [t for t in tasks if t["id"] not in done]
    print(f"{len(tasks)} samples on {dataset.name} ({len(tasks) - len(todo)} already in {out}, "
          f"{len(todo)} to make)")

    toolbox = tools.Toolbox(enabled=args.tools.split(","))
    policy = tools.load_policy(args.policy, seed=args.seed, device=args.device, temperature=args.temperature)
    records = list(done.values())   # the summary and gallery show everything in OUT
    with open(out / "trajectories.jsonl", "a") as log, tqdm(total=len(todo), desc="synthesizing") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            episodes = [tools.make_task(dataset, t) for t in batch]
            results = tools.run_episodes(policy, episodes, toolbox, args.max_turns,
                                         on_finish=lambda e: bar.update())
            for record in results:
                record = save_record(record, out, toolbox)
                log.write(json.dumps(record) + "\n")
                records.append(record)
            log.flush()
            os.fsync(log.fileno())

    summary = tools.episode_stats(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_gallery(out, records)
    write_overview(out, records)
    print(tools.format_stats(summary))
    print(f"gallery: {out / 'index.html'}")


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
