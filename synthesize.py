"""
synthesize.py -- run the agent on normal images and write the anomalies it synthesizes.

    python synthesize.py                                  # expert agent, toy world, eval categories
    python synthesize.py --data mvtec --data-root /data/mvtec_anomaly_detection --per-type 30
    python synthesize.py --tools PG,IG,QE,MG --out runs/synth-no-kr   # ablation: no knowledge
    python synthesize.py --method draem --out runs/synth-draem        # a baseline, same layout

--method picks the generator: the agent (default), or a baseline that evaluate.py compares with it:
  fixed-prompt  one image_gen call with one fixed generic prompt, its mask from the mask tool; no agent
  draem         Perlin-noise masks blended with a texture, as DRAEM does (procedural textures: the
                DTD textures DRAEM uses are not available offline)
  cutpaste      a patch of the image itself, colour-jittered and pasted elsewhere (CutPaste)
The baselines write no conversation: their trajectories.jsonl records hold the files and the judge's
score of each sample, so resuming, the gallery and evaluate.py work the same for every method.

For every (category, anomaly type) it plays --per-type episodes, each on a normal training image,
through the shared episode runner (tools.run_episodes), and writes:

    OUT/<category>/<type>/image/<i>.png       the final anomaly image (the layout evaluate.py reads)
    OUT/<category>/<type>/mask/<i>.png        its mask
    OUT/<category>/<type>/steps/<i>/<k>.png   every image of the episode, k = the agent's numbering
    OUT/trajectories.jsonl                    one trajectory per line, in build_trajectories.py's format
    OUT/index.html                            a gallery: normal, anomaly, mask and the agent's turns
    OUT/overview.png                          one row per type: normal, then anomalies and outlines
    OUT/config.json, OUT/summary.json         the settings, and the run's rates

--layout mvtec writes the samples as an MVTec-AD dataset instead, which anomaly detectors (anomalib's
MVTec-AD and Folder datamodules, this project's --data mvtec) train on directly:

    OUT/<category>/train/good/<name>.png                 the normal images the episodes edited
    OUT/<category>/test/<type>/<i>.png                   the anomaly images
    OUT/<category>/ground_truth/<type>/<i>_mask.png      their masks (0/255, the image's size)
    OUT/steps/<category>/<type>/<i>/<k>.png              the episodes' images, outside the dataset

Rerunning with the same settings resumes: finished samples are kept and only missing ones are made.
Several processes (`torchrun --nproc_per_node N synthesize.py ...`, README) share out the missing
samples; each appends its finished ones to its own OUT/trajectories.rank<r>.jsonl, which rank 0
merges into trajectories.jsonl (also at the start, after a killed run) before it writes the
gallery. The samples and their ids are those of one process.
The policy is the scripted expert by default, or a trained model (--policy runs/sft or runs/rl), here
or behind an OpenAI-compatible server (--policy openai:http://localhost:8000/v1#runs/rl after
`vllm serve runs/rl`; the API key, if any, from OPENAI_API_KEY).
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
from scipy import ndimage
from tqdm import tqdm

import tools


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default="toy", help="toy (built in, generated on first use), mvtec, visa, "
                      "or images (one folder of your own normal photos; --categories names the item)")
    data.add_argument("--data-root", default=None, help="the dataset's folder (for toy: where to cache it)")
    data.add_argument("--size", type=int, default=None, help="image side in pixels (toy 128, real 256)")
    data.add_argument("--categories", default=None, help="comma list; default: the evaluation group")
    data.add_argument("--types", default=None, help="comma list of anomaly types; default: all")
    data.add_argument("--per-type", type=int, default=5, help="samples per (category, type)")
    agent = p.add_argument_group("generator")
    agent.add_argument("--method", default="agent", help="agent (default), or a baseline: fixed-prompt, draem, cutpaste")
    agent.add_argument("--policy", default="expert", help="expert (scripted), a trained model folder (runs/sft), a Hugging Face id, or a served model: openai:<base-url>#<model>")
    agent.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of a model policy (0: greedy)")
    agent.add_argument("--device", default=None, help="where a model policy runs: cpu or cuda (default: cuda if there is one)")
    agent.add_argument("--tools", default="PG,IG,QE,KR,MG", help="tools the agent may call (ablations)")
    agent.add_argument("--max-turns", type=int, default=10, help="turns per episode (paper: 10)")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/synth", help="output folder; an existing one is resumed")
    run.add_argument("--layout", default="by-type", help="by-type (<cat>/<type>/image|mask, read by evaluate.py) or mvtec (an MVTec-AD dataset)")
    run.add_argument("--seed", type=int, default=0, help="seed of the agent and the tools")
    run.add_argument("--batch-size", type=int, default=16, help="episodes played side by side")
    tools.add_backend_flags(p)
    return p.parse_args(argv)


# settings that change what a sample looks like: a resumed run must share them
RUN_SETTINGS = ("data", "data_root", "size", "method", "policy", "temperature", "tools", "max_turns",
                "seed", *tools.BACKEND_SETTINGS, "layout")
LAYOUTS = ("by-type", "mvtec")


def prepare_out(out, args, dataset):
    """Create or resume OUT; returns the run's settings (main saves them once the generator has
    loaded, so a bad --policy leaves no run behind) and the ids of the finished samples. Never
    overwrites another run."""
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
        old.setdefault("method", "agent")   # runs made before --method existed were all the agent's
        old.setdefault("references", "off")   # and before --references, the judge had none
        for k in tools.BACKEND_SETTINGS:    # and before the backend flags, all the offline backends'
            old.setdefault(k, tools.BACKEND_DEFAULTS[k])
        old.setdefault("layout", "by-type")  # and before --layout, all by type
        diff = [f"--{k.replace('_', '-')} {old.get(k)} -> {config[k]}" for k in RUN_SETTINGS
                if old.get(k) != config[k]]
        if diff:
            raise tools.UserError(f"{out} holds a run made with other settings ({'; '.join(diff)}); "
                                  "pass another --out, or delete it")
    elif any(out.iterdir()):
        raise tools.UserError(f"{out} exists and is not a synthesize.py output; pass another --out")
    return config, set(merge_records(out))


def records_file(out) -> Path:
    """Where this process appends its finished samples: OUT/trajectories.jsonl, or with several
    processes its own OUT/trajectories.rank<r>.jsonl (merge_records joins them)."""
    return out / ("trajectories.jsonl" if tools.world_size() == 1 else f"trajectories.rank{tools.rank()}.jsonl")


def merge_records(out) -> dict:
    """The finished samples by id, from OUT/trajectories.jsonl and the per-rank files beside it
    (a killed run's too), written back as one trajectories.jsonl before the per-rank files go."""
    done, lines = {}, []
    log, parts = out / "trajectories.jsonl", sorted(out.glob("trajectories.rank*.jsonl"))
    for path in ([log] if log.exists() else []) + parts:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:   # a line cut short by a kill: that sample is redone
                continue
            if record["id"] not in done:
                done[record["id"]] = record
                lines.append(line)
    if log.exists() or parts:
        tools.write_atomic(log, "".join(line + "\n" for line in lines))
    for part in parts:
        part.unlink()
    return done


def append_records(path, records) -> None:
    """Add finished samples to OUT/trajectories.jsonl, on disk before the next batch starts: a
    kill loses at most the batch in progress."""
    try:
        with open(path, "a") as log:
            log.write("".join(json.dumps(record) + "\n" for record in records))
            log.flush()
            os.fsync(log.fileno())
    except OSError as e:
        raise tools.UserError(f"cannot write {path}: {e.strerror or e}") from None


def sample_paths(layout, sample_id, normal_image) -> dict:
    """Where a sample's files go, relative to OUT: its anomaly image, mask and episode images, and
    (mvtec) the copy of its normal image in train/good."""
    cat, t, i = sample_id.split("/")
    if layout == "mvtec":
        return {"image": f"{cat}/test/{t}/{i}.png", "mask": f"{cat}/ground_truth/{t}/{i}_mask.png",
                "steps": f"steps/{cat}/{t}/{i}", "normal": f"{cat}/train/good/{Path(normal_image).stem}.png"}
    return {"image": f"{cat}/{t}/image/{i}.png", "mask": f"{cat}/{t}/mask/{i}.png",
            "steps": f"{cat}/{t}/steps/{i}", "normal": None}


def save_record(record, out, toolbox, layout) -> dict:
    """Write the episode's images and return its JSON record, images replaced by relative paths."""
    paths = sample_paths(layout, record["id"], record["normal_image"])
    final, mask_index = record["final_image_index"], record["mask_index"]
    record["final_image"] = record["mask"] = None
    if paths["normal"]:
        tools.save_png(record["images"][0], out / paths["normal"])
    if final is not None:
        record["final_image"] = paths["image"]
        tools.save_png(record["images"][final - 1], out / record["final_image"])
        if mask_index is not None:
            mask = record["images"][mask_index - 1] > 0
        else:   # the mask tool was switched off: measure the change afterwards, outside the agent
            mask = toolbox.segmenter.segment(record["images"][0], record["images"][final - 1])
        record["mask"] = paths["mask"]
        tools.save_png(mask, out / record["mask"])
    record["step_images"] = tools.save_episode_images(record["messages"], record.pop("images"), out,
                                                      paths["steps"])
    record["messages"], record["images"] = tools.stored_conversation(record["messages"])
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
        messages = tools.live_conversation(r["messages"], r["images"]) if "images" in r else r["messages"]
        for m in messages[2:]:   # (runs made before the stored format have the paths in the parts)
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
    tools.write_atomic(out / "index.html", page)


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


# ---- the baselines (--method): one function per method, (task, toolbox, rng) -> image, mask, notes

METHODS = ("agent", "fixed-prompt", "draem", "cutpaste")


def fixed_prompt(task, toolbox, rng):
    """The paper's "image model, fixed prompt" baseline: one image_gen call with the generic local-edit
    prompt (the type and the item, no look, place or size) and one mask_gen call; the same tool
    backends the agent calls, without the agent."""
    prompt = tools.local_edit_prompt(task.anomaly_type, f"the {task.category.replace('_', ' ')}")
    edited = toolbox.editor.edit(task.image, prompt, task.kind, rng)
    return edited, toolbox.segmenter.segment(task.image, edited), {"prompt": prompt}


def perlin_noise(shape, cells, rng) -> np.ndarray:
    """Gradient (Perlin) noise in about [-1, 1]: random unit gradients on a (cells+1) lattice,
    blended with the quintic fade curve, scaled by sqrt(2) (DRAEM's threshold 0.5 assumes that range)."""
    cy, cx = cells
    angle = rng.uniform(0, 2 * np.pi, (cy + 1, cx + 1))
    gy, gx = np.sin(angle), np.cos(angle)
    y = np.arange(shape[0]) * cy / shape[0]
    x = np.arange(shape[1]) * cx / shape[1]
    iy, ix = y.astype(int), x.astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy, dx):   # the dot product of the corner's gradient with the offset to the pixel
        ky, kx = (iy + dy)[:, None], (ix + dx)[None, :]
        return gy[ky, kx] * (fy - dy) + gx[ky, kx] * (fx - dx)

    def fade(t):
        return t * t * t * (t * (6 * t - 15) + 10)

    u, v = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return np.sqrt(2) * (top * (1 - u) + bottom * u)


def procedural_texture(side, rng) -> np.ndarray:
    """A stand-in for a DTD texture: fractal noise, stripes or a checkerboard in random colours,
    with a random gamma (DRAEM also alters its textures before blending)."""
    kind = rng.choice(["fractal", "stripes", "checker"])
    if kind == "fractal":
        field = sum(perlin_noise((side, side), (2 ** k, 2 ** k), rng) / 2 ** (k / 2) for k in range(1, 6))
    else:
        yy, xx = np.mgrid[:side, :side] / side
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.03, 0.25)
        along = (yy * np.sin(angle) + xx * np.cos(angle)) / period
        across = (-yy * np.cos(angle) + xx * np.sin(angle)) / period
        field = np.sin(2 * np.pi * along) if kind == "stripes" else \
            np.sign(np.sin(np.pi * along) * np.sin(np.pi * across))
    field = (field - field.min()) / (np.ptp(field) + 1e-6)
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    texture = low + field[..., None] * (high - low)
    return 255 * (texture / 255) ** rng.uniform(0.5, 2.0)


def draem(task, toolbox, rng):
    """DRAEM's simulated anomaly: a Perlin-noise mask (lattice 2^0..2^5 cells per side, rotated,
    thresholded at 0.5) where the image is blended with a texture, image weight beta ~ U(0, 0.8).
    As in DRAEM, the mask may fall anywhere, background included."""
    side = task.image.shape[0]
    for _ in range(100):   # redraw empty or near-empty masks: every sample must hold an anomaly
        noise = perlin_noise((side, side), tuple(2 ** rng.integers(0, 6, 2)), rng)
        noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, mode="reflect")
        mask = noise > 0.5
        if mask.sum() >= 0.002 * side * side:
            break
    beta = rng.uniform(0, 0.8)
    texture = procedural_texture(side, rng)
    image = task.image.astype(np.float32)
    blended = beta * image + (1 - beta) * texture
    out = np.where(mask[..., None], blended, image)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask, {"beta": round(float(beta), 3)}


def cutpaste(task, toolbox, rng):
    """CutPaste: a rectangle of 2-15% of the image (aspect ratio 0.3-3.3) is cut, jittered in
    brightness, contrast, saturation and hue (+-10%), and pasted at a random place."""
    side = task.image.shape[0]
    area = rng.uniform(0.02, 0.15) * side * side
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
    h = int(np.clip(round(np.sqrt(area * aspect)), 2, side - 1))
    w = int(np.clip(round(np.sqrt(area / aspect)), 2, side - 1))
    y0, x0, y1, x1 = (int(rng.integers(0, side - d + 1)) for d in (h, w, h, w))
    patch = task.image[y0:y0 + h, x0:x0 + w].astype(np.float32)
    patch = patch * rng.uniform(0.9, 1.1)                                        # brightness
    patch = (patch - patch.mean()) * rng.uniform(0.9, 1.1) + patch.mean()        # contrast
    grey = patch.mean(axis=2, keepdims=True)
    patch = grey + (patch - grey) * rng.uniform(0.9, 1.1)                        # saturation
    # hue is an angle around RGB's grey axis: rotate the colours by up to 10% of a turn
    theta, k = rng.uniform(-0.1, 0.1) * 2 * np.pi, np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    patch = patch @ (np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross).T
    out = task.image.copy()
    out[y1:y1 + h, x1:x1 + w] = np.clip(np.round(patch), 0, 255).astype(np.uint8)
    mask = np.zeros((side, side), bool)
    mask[y1:y1 + h, x1:x1 + w] = True
    return out, mask, {}


BASELINES = {"fixed-prompt": fixed_prompt, "draem": draem, "cutpaste": cutpaste}


def run_baseline(method, dataset, batch, toolbox, out, layout) -> list:
    """Make each task's sample with a baseline and return records in the agent's record format
    (no conversation), with the judge's score of the result for the summary."""
    records = []
    for planned in batch:
        task = tools.make_task(dataset, planned)
        rng = np.random.default_rng([task.seed, tools.stable_seed(method)])
        cat, t, i = task.id.split("/")
        paths = sample_paths(layout, task.id, task.image_path)
        record = {"id": task.id, "method": method, "dataset": task.dataset, "category": cat,
                  "anomaly_type": t, "seed": task.seed, "normal_image": task.image_path,
                  "messages": [], "turns": [], "attempts": [], "qe_scores": [], "num_turns": 0,
                  "final_image": None, "mask": None, "final_image_index": None, "final_score": None,
                  "error": None}
        try:
            image, mask, notes = BASELINES[method](task, toolbox, rng)
        except tools.ToolError as e:   # the painter cannot read the fixed prompt (an unknown type)
            record["error"] = str(e)
            image = mask = None
            notes = {}
        record.update(notes)
        record["step_images"] = [f"{paths['steps']}/1.png"]
        tools.save_png(task.image, out / record["step_images"][0])
        if paths["normal"]:
            tools.save_png(task.image, out / paths["normal"])
        if image is not None:
            record.update(final_image=paths["image"], mask=paths["mask"],
                          final_image_index=2, mask_area=round(float(mask.mean()), 4))
            tools.save_png(image, out / record["final_image"])
            tools.save_png(mask, out / record["mask"])
            record["step_images"].append(record["final_image"])
            judged = toolbox.judge.evaluate(task.image, image, task.kind, toolbox.entry(task))
            record["final_score"] = judged["score"]
            record["qe_scores"] = [judged["score"]]
        records.append(record)
    return records


def baseline_stats(records) -> dict:
    made = [r for r in records if r["final_image"]]
    scores = [r["final_score"] for r in made]
    n = max(len(records), 1)
    return {"samples": len(records), "made": len(made) / n,
            "nonempty_mask": sum(r["mask_area"] > 0 for r in made) / n,
            "mean_mask_area": float(np.mean([r["mask_area"] for r in made])) if made else None,
            "mean_final_score": float(np.mean(scores)) if scores else None,
            "passed": sum(s >= tools.PASS_SCORE for s in scores) / n}


def format_baseline_stats(method, s) -> str:
    area = "n/a" if s["mean_mask_area"] is None else f"{s['mean_mask_area']:.1%}"
    score = "n/a" if s["mean_final_score"] is None else f"{s['mean_final_score']:.2f}"
    return (f"{s['samples']} samples ({method}) | made {s['made']:.0%} | non-empty mask "
            f"{s['nonempty_mask']:.0%} | mean mask area {area} | mean QE of the judge {score} | "
            f"passed {s['passed']:.0%}")


def main(argv=None):
    args = get_args(argv)
    tools.init_distributed(args.device)   # under torchrun; one process without it
    args.tools = ",".join(tools.parse_tools_flag(args.tools))
    if args.method not in METHODS:
        raise tools.UserError(f"--method must be one of {', '.join(METHODS)}, not '{args.method}'")
    if args.method != "agent" and args.policy != "expert":
        raise tools.UserError(f"--policy is for --method agent; --method {args.method} runs no agent")
    if args.layout not in LAYOUTS:
        raise tools.UserError(f"--layout must be one of {', '.join(LAYOUTS)}, not '{args.layout}'")
    for flag in ("per_type", "max_turns", "batch_size"):
        if getattr(args, flag) < 1:
            raise tools.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.temperature >= 0:
        raise tools.UserError(f"--temperature must be at least 0 (0: greedy), not {args.temperature}")
    with tools.main_first():   # rank 0 may generate the toy world and measure its references; the others read them
        dataset = tools.load_dataset(args.data, args.data_root, args.size, categories=args.categories)
        categories = tools.comma_list(args.categories, "--categories") if args.categories else dataset.eval_categories
        toolbox = tools.make_toolbox(args, args.tools.split(","), dataset=dataset, categories=categories)
    notice = tools.offline_notice(dataset.name, toolbox)
    if notice:   # first, before anything else is said about the run
        print(notice)
    out = Path(args.out)
    tasks = tools.plan_tasks(dataset, args.categories, args.types, args.per_type, args.seed)
    # rank 0 alone reads OUT (and merges what a killed run's ranks left); every rank learns what is done
    config, done = tools.on_main(prepare_out, out, args, dataset)
    todo = [t for t in tasks if t["id"] not in done]
    print(f"{len(tasks)} samples on {dataset.name} ({len(tasks) - len(todo)} already in {out}, "
          f"{len(todo)} to make)")
    mine = tools.shard(todo)   # this rank's share

    if args.method == "agent":
        policy = tools.load_policy(args.policy, seed=args.seed, device=args.device, temperature=args.temperature)
    if tools.is_main():
        tools.write_json(out / "config.json", config)
    tools.barrier()   # no rank writes a sample before config.json says whose run OUT holds
    with tqdm(total=len(mine), desc="synthesizing", disable=not tools.is_main()) as bar:
        for start in range(0, len(mine), args.batch_size):
            batch = mine[start:start + args.batch_size]
            if args.method != "agent":
                results = run_baseline(args.method, dataset, batch, toolbox, out, args.layout)
                bar.update(len(batch))
            else:
                episodes = [tools.make_task(dataset, t) for t in batch]
                results = [save_record(r, out, toolbox, args.layout) for r in tools.run_episodes(
                    policy, episodes, toolbox, args.max_turns, on_finish=lambda e: bar.update())]
            append_records(records_file(out), results)

    tools.barrier()   # every rank's samples are on disk
    if not tools.is_main():
        tools.leave()   # waits there while rank 0 writes the one trajectories.jsonl, the summary and the gallery
        return
    records = list(merge_records(out).values())   # everything in OUT
    if args.method == "agent":
        summary = tools.episode_stats(records)
        line = tools.format_stats(summary)
    else:
        summary = baseline_stats(records)
        line = format_baseline_stats(args.method, summary)
    tools.write_json(out / "summary.json", summary)
    write_gallery(out, records)
    write_overview(out, records)
    print(line)
    print(f"gallery: {out / 'index.html'}")
    tools.leave()


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
