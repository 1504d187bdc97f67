"""
build_trajectories.py -- structured SFT trajectories by reverse synthesis (docs/METHOD.md section 4).

    python build_trajectories.py                                        # toy world, training group
    python build_trajectories.py --data visa --data-root /data/VisA     # the paper's setting

For every real anomaly (image, mask, type) of the training categories:
  1. reverse synthesis: a clean counterpart, the defect removed (tools.clean_counterpart): on objects
     photographed in a fixed pose, the masked region from the best-aligned normal image (a small
     search over shifts and rotations), feathered; elsewhere exemplar fill (the best-matching nearby
     patch of the same image is copied over it). The rest of the image stays identical;
  2. N in {1..--n-max} attempts: the real anomaly is the final, passing attempt; before it come real
     image_gen outputs from weaker prompts (a bare generic prompt, then a detailed one with one thing
     wrong) that the real quality_eval fails;
  3. the trajectory, written forward: PG (its prompt describes attempt 1), IG -> QE per attempt,
     KR after the first failed QE with probability --kr-prob, the agent's rewritten prompt
     (describing the next attempt, read from its mask: where, how large, how elongated, darker,
     brighter or which colour), MG on the final image, the answer. Thinking explains every step.
  4. with probability --ran-out-prob, a second trajectory from the same clean image for Algorithm 1's
     other exit: --n-max weaker attempts that all fail, then MG on the last one (Algorithm 1's I_k)
     and an answer with status "partial". Without it SFT never shows what to do when the attempts
     run out, and the policy refines until max_turns (DECISION; the paper's data only ends on a pass).

Writes OUT/train.jsonl and OUT/val.jsonl in the format TRL's vision-language SFT reads as it is:
"messages" whose contents are lists of parts, image parts bare {"type": "image"} placeholders, and
"images", the files in placeholder order, relative to OUT (the images are under OUT/images/). The
tool schemas are part of the system prompt, once. --format llamafactory also writes the sharegpt
form LLaMA-Factory reads (OUT/sharegpt_{train,val}.jsonl, "<image>" placeholders) and its
OUT/dataset_info.json entries (anomalyagent_train, anomalyagent_val).
OUT also gets manifest.json (dataset, root, categories, backends, seed), which sft.py checks against the
data it is told to train on. OUT defaults to runs/trajectories/<data>. Each real anomaly it skips is
printed with why.
Simplifies: the paper removes defects with an image editor; aligned and exemplar fill are our stand-ins.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

import tools


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="toy", help="toy, mvtec or visa: real anomalies with masks and types")
    p.add_argument("--data-root", default=None, help="the dataset's folder")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (toy 128, real 256)")
    p.add_argument("--categories", default=None, help="comma list; default: the training group")
    p.add_argument("--n-max", type=int, default=3, help="most image attempts per trajectory (N in 1..n-max)")
    p.add_argument("--kr-prob", type=float, default=0.5, help="chance of knowledge retrieval after a failed QE")
    p.add_argument("--ran-out-prob", type=float, default=0.25,
                   help="chance of an extra trajectory whose --n-max attempts all fail (0: passing ends only)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of anomalies held out for validation")
    p.add_argument("--limit", type=int, default=None, help="use at most this many anomalies (quick runs)")
    p.add_argument("--out", default=None, help="output folder (default: runs/trajectories/<data>)")
    p.add_argument("--format", default="trl", help="trl (always written), or llamafactory: also the sharegpt form")
    p.add_argument("--seed", type=int, default=0, help="seed of attempts, N and KR")
    tools.add_backend_flags(p)
    return p.parse_args(argv)


# ---- describing an attempt in the painter's words ---------------------------------------------

POSITIONS = [("top-left", 0, 0), ("top", 0, 1), ("top-right", 0, 2), ("left", 1, 0), ("center", 1, 1),
             ("right", 1, 2), ("bottom-left", 2, 0), ("bottom", 2, 1), ("bottom-right", 2, 2)]


def describe(clean, image, mask, entry, kind) -> dict:
    """The local-edit prompt's attributes (tools.local_edit_prompt) that say what the change from
    clean to image shows: tone, colour, size, elongation, place, contrast. The knowledge entry says
    which of them the type is about: part, shape and edges come from it, and a type it calls a
    colour change (or a removal to background) gets no dark/bright word."""
    attrs = entry["attributes"]
    side = mask.shape[0]
    before, after = clean[mask].astype(np.float32), image[mask].astype(np.float32)
    dl = float(tools.luminance(after[None]).mean() - tools.luminance(before[None]).mean())
    chroma = (after - after.mean(1, keepdims=True)).mean(0)   # the defect's own colour, less its grey
    shift = chroma - (before - before.mean(1, keepdims=True)).mean(0)
    colour = None
    if np.linalg.norm(chroma) > 15 and np.linalg.norm(shift) > 12:
        hue = lambda c: np.array(c, np.float32) - np.mean(c)
        colour = max(tools.HUES, key=lambda n: chroma @ hue(tools.COLOURS[n]) / np.linalg.norm(hue(tools.COLOURS[n])))
    # a tone word only where the knowledge says brightness is the defect's look: a colour defect's
    # brightness comes with its colour, and the painter reads "dark brown" as darken, then tint
    tone = None if attrs["tone"] in ("background", "colour") else "dark" if dl < -10 else "bright" if dl > 10 else None
    cy, cx = ndimage.center_of_mass(mask)
    where = next(n for n, r, c in POSITIONS if r == min(int(3 * cy / side), 2) and c == min(int(3 * cx / side), 2))
    place = f"in the {where}"
    if kind == "object":
        fg = tools.foreground_mask(clean, kind)
        solid = ndimage.binary_fill_holes(fg)
        outline = ndimage.binary_dilation(solid & ~ndimage.binary_erosion(solid), iterations=2)
        place = f"at the edge of {attrs['part']}" if (mask & outline).any() else f"in the {where}, away from the outline"
    contrast = np.abs(after - before).mean()
    return dict(anomaly_type=entry["type"], part=attrs["part"], shape=attrs["shape"], tone=tone, colour=colour,
                size_px=tools.extent_px(mask), length="long" if tools.elongation(mask) >= 2.5 else "across",
                visibility="clearly visible with high contrast" if contrast > 30 else "subtle but visible",
                edges="soft, blended edges" if attrs["edge"] == "soft" else "crisp edges", place=place)


def weak_prompts(entry, final, rng):
    """Prompts a first try might use: bare and generic, or the final attributes with one thing wrong
    (faint, the other edges, the other tone, a size far off), none equal to the final prompt: a type
    without a tone word has no tone to flip, a faint defect nothing to make fainter."""
    generic = tools.local_edit_prompt(entry["type"], entry["attributes"]["part"], entry["attributes"]["shape"])
    flipped_edges = "sharp edges" if final["edges"] == "soft, blended edges" else "soft, blended edges"
    flipped_tone = {"dark": "bright", "bright": "dark"}.get(final["tone"])
    wrong = [dict(final, visibility="faint and subtle") if final["visibility"].startswith("clearly") else final,
             dict(final, edges=flipped_edges),
             dict(final, tone=flipped_tone),
             dict(final, size_px=int(final["size_px"] * rng.choice([0.35, 2.6])))]
    detailed = [tools.local_edit_prompt(**wrong[i]) for i in rng.permutation(len(wrong))]
    passing = tools.local_edit_prompt(**final)
    return generic, [prompt for prompt in detailed if prompt != passing]


# ---- one trajectory -----------------------------------------------------------------------------

def failing_attempt(toolbox, task, entry, prompts, rng, tries=6):
    """A real image_gen output from one of the prompts that quality_eval fails, or None."""
    for prompt in prompts:
        for _ in range(tries):
            try:
                image = toolbox.editor.edit(task.image, prompt, task.kind, rng)
            except tools.ToolError:
                break
            if toolbox.judge.evaluate(task.image, image, task.kind, entry)["score"] < tools.PASS_SCORE:
                return prompt, image
    return None


def build_one(toolbox, task, anomaly_image, mask, n_attempts, use_kr, rng, ran_out=False):
    """The trajectory's messages, or None when the real anomaly does not pass quality evaluation
    (or, with ran_out, when fewer than n_attempts failing attempts could be made)."""
    entry = toolbox.entry(task)
    item, defect = task.category.replace("_", " "), task.anomaly_type.replace("_", " ")
    final = describe(task.image, anomaly_image, mask, entry, task.kind)
    if toolbox.judge.evaluate(task.image, anomaly_image, task.kind, entry)["score"] < tools.PASS_SCORE:
        return None
    generic, detailed = weak_prompts(entry, final, rng)
    n_failing = n_attempts if ran_out else n_attempts - 1
    attempts = []
    for i in range(n_failing):
        found = failing_attempt(toolbox, task, entry, [generic] if i == 0 else detailed, rng)
        if found is None:
            break
        attempts.append(found)
    if ran_out and len(attempts) < n_failing:
        return None
    if not ran_out:
        attempts.append((tools.local_edit_prompt(**final), anomaly_image))

    session = toolbox.session(task)
    messages = [{"role": "system", "content": tools.system_prompt(toolbox.specs())}, tools.user_message(task)]

    def turn(thinking, name, arguments, reply=None):
        """One assistant turn and the tool's observation (reply: what the tool is taken to return)."""
        messages.append({"role": "assistant", "content": tools.format_call(thinking, name, arguments)})
        result, images = reply or session.call(name, arguments)
        messages.append(tools.observation(name, result, images))
        return result

    # prompt_gen is taken to have written attempt 1's prompt: the trajectory shows what it produced
    turn(f"Image 1 is a normal {item}. I need a local-edit prompt for a {defect}, so I call prompt_gen.",
         "prompt_gen", {"image": 1, "item_name": item, "anomaly_type": defect},
         reply=({"prompt": attempts[0][0]}, []))
    review, knowledge = None, None
    for m, (prompt, image) in enumerate(attempts):
        if m == 0:
            # no words copied from the prompt here: a small policy that starts copying it in the
            # thinking runs on into the prompt's next words and never closes the tag
            thinking = "prompt_gen wrote a local-edit prompt. I edit the original, image 1, with it as it is."
        else:
            thinking = (f"The review said: \"{review}\"" + (
                f" The knowledge base says it is {knowledge['attributes']['tone']}, "
                f"{knowledge['attributes']['extent'][0]:.0%}-{knowledge['attributes']['extent'][1]:.0%} "
                "of the image." if knowledge else "") + " I rewrite the prompt to fix that and edit image 1 again.")
        k = turn(thinking, "image_gen", {"prompt": prompt, "target_image": 1},
                 reply=session.add_generated(image, prompt))["image_index"]
        result = turn(f"Image {k} is attempt {m + 1}. I check its location and quality with quality_eval.",
                      "quality_eval", {"anomaly_image": k, "item_name": item, "anomaly_type": defect})
        score = result["score"]
        review = result["review"].split(". ", 1)[-1]   # quoted in the thinking: the review less its verdict
        # knowledge retrieval only for a type the base describes (an unknown one gets an error)
        if m + 1 < len(attempts) and use_kr and knowledge is None and "description" in entry:
            knowledge = turn(f"Score {score:g}/10 is below {tools.PASS_SCORE:g}. Before rewriting the prompt "
                             f"I look up how a {defect} on a {item} looks.", "knowledge_retrieval",
                             {"item_name": item, "anomaly_type": defect})
    if ran_out:   # Algorithm 1 keeps the last attempt, I_k: one index to carry, not a comparison
        why = (f"Score {score:g}/10 is below {tools.PASS_SCORE:g}, and image {k} was attempt {len(attempts)}, "
               "my last, so I keep it")
    else:
        why = f"Image {k} scored {score:g}/10, which passes"
    mask_result = turn(f"{why}. I extract its mask with mask_gen.", "mask_gen", {"anomaly_image": k})
    messages.append({"role": "assistant", "content": tools.format_answer(
        f"The mask covers {100 * mask_result['area_fraction']:.1f}% of the image. Image {k} is the "
        + (f"last of my {len(attempts)} attempts." if ran_out else "result."),
        {"status": "partial" if ran_out else "success", "final_image_index": k, "mask_generated": True,
         "synthesis_logic": f"a {defect} on the {item} after {len(attempts)} attempt(s)"})})
    return messages, session.images, len(attempts)


# ---- the sharegpt form (LLaMA-Factory) ---------------------------------------------------------

def sharegpt_row(record) -> dict:
    """A stored trajectory as LLaMA-Factory's sharegpt reads it: text contents with an <image>
    placeholder where each image goes; tool observations keep the role "tool" (its observation tag)."""
    return {"messages": [{"role": m["role"], "content": "".join("<image>" if p["type"] == "image" else p["text"]
                                                                for p in m["content"])}
                         for m in record["messages"]],
            "images": record["images"]}


def write_sharegpt(out, splits) -> None:
    """OUT/sharegpt_<split>.jsonl and OUT/dataset_info.json (LLaMA-Factory's --dataset_dir OUT)."""
    info = {}
    for split, records in splits.items():
        if not records:
            continue
        name = f"sharegpt_{split}.jsonl"
        tools.write_atomic(out / name, "".join(json.dumps(sharegpt_row(r)) + "\n" for r in records))
        info[f"anomalyagent_{split}"] = {
            "file_name": name, "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "system_tag": "system", "user_tag": "user",
                     "assistant_tag": "assistant", "observation_tag": "tool"}}
    tools.write_atomic(out / "dataset_info.json", json.dumps(info, indent=1))


def print_residuals(residuals):
    """Per category and fill method: the mean change the removal made inside the masks, beside how
    much two aligned normal images differ there (a fill changes the defect by far more than that;
    a change near it would mean the defect was left in place)."""
    print("clean counterparts (residual inside the mask | normal-to-normal residual there, grey levels):")
    for (cat, how), pairs in sorted(residuals.items()):
        inside = np.mean([p[0] for p in pairs])
        between = [p[1] for p in pairs if p[1] is not None]
        print(f"  {cat}: {how} fill for {len(pairs)}: {inside:.1f} | "
              + (f"{np.mean(between):.1f}" if between else "n/a (fewer than 2 normal images)"))


def write_manifest(out, dataset, categories, toolbox, seed):
    """OUT/manifest.json: what the trajectories were built from, so sft.py can refuse another dataset's."""
    manifest = {"dataset": dataset.name, "root": str(dataset.root.resolve()), "categories": categories,
                "size": dataset.image_size, "seed": seed, "references": bool(toolbox.references),
                "backends": {tool: type(backend).__name__ for tool, backend in (
                    ("prompt_gen", toolbox.prompt_writer), ("image_gen", toolbox.editor),
                    ("quality_eval", toolbox.judge), ("mask_gen", toolbox.segmenter))}}
    tools.write_json(out / "manifest.json", manifest)


def main(argv=None):
    args = get_args(argv)
    if args.format not in ("trl", "llamafactory"):
        raise tools.UserError(f"--format must be trl or llamafactory, not '{args.format}'")
    if not 1 <= args.n_max <= 5:
        raise tools.UserError("--n-max must be between 1 and 5")
    for flag, value in (("--kr-prob", args.kr_prob), ("--ran-out-prob", args.ran_out_prob)):
        if not 0 <= value <= 1:
            raise tools.UserError(f"{flag} must be between 0 and 1, got {value}")
    if not 0 <= args.val_fraction < 1:
        raise tools.UserError(f"--val-fraction must be at least 0 and below 1, got {args.val_fraction}")
    if args.limit is not None and args.limit < 1:
        raise tools.UserError(f"--limit must be at least 1, got {args.limit}")
    out = Path(args.out or f"runs/trajectories/{args.data}")
    if (out / "train.jsonl").exists():
        raise tools.UserError(f"{out} already holds trajectories; pass another --out or delete it")
    dataset = tools.load_dataset(args.data, args.data_root, args.size)
    categories = tools.comma_list(args.categories, "--categories") if args.categories else dataset.train_categories
    anomalies = [anomaly for c in categories for anomaly in dataset.anomalies[dataset.check_category(c)]]
    if not anomalies:
        raise tools.UserError(f"no labelled anomalies with masks in {', '.join(categories)} of "
                              f"{dataset.root}: trajectories are built from real anomalies")
    rng = np.random.default_rng(args.seed)
    anomalies = [anomalies[i] for i in rng.permutation(len(anomalies))][:args.limit]
    toolbox = tools.make_toolbox(args, dataset=dataset, categories=categories)
    notice = tools.offline_notice(dataset.name, toolbox)
    if notice:
        print(notice)
    splits, counts = {"train": [], "val": []}, Counter()
    normals, residuals = {}, {}   # per category: normal images to align; residuals of the clean counterparts
    for anomaly in tqdm(anomalies, desc="trajectories"):
        record_id = f"{anomaly.category}/{anomaly.anomaly_type}/{anomaly.image.stem}"
        anomaly_image, mask = dataset.load_anomaly(anomaly)
        if not mask.any():
            counts["skipped: empty mask"] += 1
            tqdm.write(f"skipped {record_id}: its mask {anomaly.mask} is empty")
            continue
        cat = anomaly.category
        if cat not in normals:
            normals[cat] = [dataset.load(p) for p in dataset.train_good[cat][:tools.ALIGN_NORMALS]]
        clean, how = tools.clean_counterpart(anomaly_image, mask, dataset.kinds[cat], normals[cat], dataset.fixed_pose[cat])
        residuals.setdefault((cat, how), []).append(
            (tools.change_map(anomaly_image, clean)[mask].mean(), tools.normal_residual(normals[cat], mask)))
        task = tools.Task(id=record_id, category=cat, anomaly_type=anomaly.anomaly_type, image=clean,
                          kind=dataset.kinds[cat], dataset=dataset.name, seed=tools.stable_seed(args.seed, record_id))
        passing_rng = np.random.default_rng(task.seed)
        try:
            built = build_one(toolbox, task, anomaly_image, mask, int(passing_rng.integers(1, args.n_max + 1)),
                              bool(passing_rng.random() < args.kr_prob), passing_rng)
        except tools.BackendError as e:   # a model judge or editor failed: skipped; in a row, they stop the run
            toolbox.count_backend_error("quality_eval", e)
            counts["skipped: backend error"] += 1
            continue
        toolbox.count_backend_error("quality_eval")
        if built is None:
            counts["skipped: real anomaly failed QE"] += 1
            judged = toolbox.judge.evaluate(task.image, anomaly_image, task.kind, toolbox.entry(task))
            tqdm.write(f"skipped {record_id}: quality_eval scores the real anomaly against its clean "
                       f"counterpart {judged['score']:g}/10 (< {tools.PASS_SCORE:g}): {judged['review']}")
            continue
        variants = [(record_id, built, False)]
        # its own generator, so --ran-out-prob leaves the passing trajectories as they were
        ran_out_rng = np.random.default_rng([task.seed, 1])
        if ran_out_rng.random() < args.ran_out_prob:
            ran_out = build_one(toolbox, task, anomaly_image, mask, args.n_max,
                                bool(ran_out_rng.random() < args.kr_prob), ran_out_rng, ran_out=True)
            if ran_out is not None:
                variants.append((record_id + "-ran-out", ran_out, True))
        # both variants of one anomaly go to the same split
        split = "val" if tools.stable_seed("split", record_id) % 1000 < 1000 * args.val_fraction else "train"
        for variant_id, (messages, images, n), attempts_ran_out in variants:
            tools.save_episode_images(messages, images, out, f"images/{variant_id}")
            messages, paths = tools.stored_conversation(messages)
            splits[split].append({"id": variant_id, "category": anomaly.category, "anomaly_type": anomaly.anomaly_type,
                                  "n_attempts": n, "attempts_ran_out": attempts_ran_out,
                                  "messages": messages, "images": paths})
            counts[f"N={n}, attempts ran out" if attempts_ran_out else f"N={n}"] += 1
            counts[anomaly.category] += 1
    if not splits["train"]:
        raise tools.UserError("no trajectory could be built (every real anomaly failed quality evaluation)")
    write_manifest(out, dataset, categories, toolbox, args.seed)
    for split, records in splits.items():
        tools.write_atomic(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if args.format == "llamafactory":
        write_sharegpt(out, splits)
    print(f"{len(splits['train'])} train + {len(splits['val'])} val trajectories in {out}")
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    print_residuals(residuals)


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
