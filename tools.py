"""
tools.py -- everything the stages share, in the order a reader needs it:

  1. Data: atomic writes and how several processes (torchrun's ranks) share the work; the toy
     world, MVTec-AD, VisA and a folder of photos behind one small interface; clean counterparts
     of real anomalies, and the statistics of a type's few-shot references
  2. Knowledge: the knowledge base (knowledge.json), and attributes guessed for unknown types
  3. The tools: their schemas, one small interface per backend (PromptWriter, ImageEditor, Judge,
     Segmenter), the real-model backends (diffusers editors, vision-language judges and prompt
     writers, OpenAI-compatible servers), the Toolbox that picks a backend per tool, and the
     session that numbers an episode's images and serves the calls
  4. The agent protocol: system prompt, tool schemas as the model sees them, turn parser, observations
  5. The episode runner: plays a policy against the tools, returns trajectory records
  6. The policies: the stored trajectory format, the chat template, the vision-language model
     wrapper (SFT, RL and synthesis share it; its sampling loop keeps each conversation's keys
     and values, prefills packed and decodes with the shared prefix read once), the tiny policy
     built from config, a policy served by an OpenAI-compatible server, and the expert (scripted)
     policy that teaches and baselines

The method is described in docs/METHOD.md. The offline backends behind the tools (a prompt writer,
a procedural painter, a measured judge, a difference segmenter) live in toy_world.py, with the toy
dataset's renderer; this module imports them, and re-exports the few measurements stages use.
"""
import atexit
import base64
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from toy_world import (  # the offline world: the toy dataset's renderer and the offline backends
    COLOURS, FAMILY_DEFAULTS, HUES, SHAPE_PHRASES, TOY_CATEGORIES, DifferenceSegmenter, MeasuredJudge,
    OfflinePromptWriter, ProceduralPainter, ToolError, background_colour, change_map, contour_steepness,
    elongation, extent_px, foreground_mask, guess_attributes, local_edit_prompt, luminance, region_mask,
    render_anomaly, render_normal)


class LazyModule:
    """A module imported when first used. Importing torch takes about 2 s; the stages that play only
    the offline tools (build_trajectories.py, synthesize.py with the expert) never use it, so they
    start in a fraction of that."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self._name), attribute)


torch = LazyModule("torch")
dist = LazyModule("torch.distributed")


def default_device() -> str:
    """cuda where a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


HERE = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem with the user's input: stages print it as one line, never as a traceback."""


def stable_seed(*parts) -> int:
    """A seed from any mix of ints and strings that is the same in every process (unlike hash())."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


# ==============================================================================================
# 1. Data
# ==============================================================================================

def _as_8bit(im):
    """16-bit (and 32-bit integer) grey images scaled to 0-255; PIL's convert would clip them at 255,
    turning a 16-bit photo white."""
    if im.mode.startswith("I"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or values.max() > 255 else 255.0
        return Image.fromarray(np.round(np.clip(values, 0, top) * 255.0 / top).astype(np.uint8), "L")
    return im


def load_image(path, size=None) -> np.ndarray:
    """An RGB image as HxWx3 uint8 (grey, RGBA and 16-bit files too), resized to size x size when
    size is given."""
    try:
        with Image.open(path) as im:
            im = _as_8bit(im).convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im).copy()
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def load_mask(path, size=None) -> np.ndarray:
    """A defect mask as HxW bool (any non-zero pixel is defect, as in MVTec-AD and VisA)."""
    try:
        with Image.open(path) as im:
            im = _as_8bit(im).convert("L")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.NEAREST)
            return np.asarray(im) > 0
    except OSError as e:
        raise UserError(f"cannot read mask {path}: {e}") from None


def image_size_of(path) -> tuple:
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def save_png(array, path) -> None:
    """Write a PNG atomically, so a killed run never leaves a half-written image behind."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def write_atomic(path, data) -> None:
    """Write data (text, bytes, or a function that writes the file at the path it is given) into a
    file beside path, then rename it over path: a killed run leaves the old file or the new one,
    never half of one. A failed write (no permission, a full disk) is a UserError naming the file.
    The file beside is this process's own, so ranks writing the same file never mix their bytes."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path, value) -> None:
    """A JSON file (settings, summaries), written atomically."""
    write_atomic(path, json.dumps(value, indent=1))


def refuse_changed_settings(out, args, may_change) -> None:
    """--resume continues a run only with the settings OUT/run_config.json saved; the flags named
    in may_change (device, logging cadence, ...) are free to differ. Otherwise one line names each
    changed flag."""
    path = Path(out) / "run_config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is corrupt; pass another --out") from None
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in vars(args).items()
               if k not in may_change and k in saved and v is not None and saved[k] != v]
    if changed:
        raise UserError(f"--resume: {out} was run with other settings ({'; '.join(changed)})")


# ---- several processes: torchrun's ranks, and how they share the work ----------------------------
# `torchrun --nproc_per_node N stage.py ...` starts N copies of a stage with RANK, WORLD_SIZE and
# LOCAL_RANK in their environment. Without torchrun (or with N = 1) every helper here is a no-op:
# one process, rank 0 of 1.

def init_distributed(device) -> None:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU; device None: default_device()), each
    process on its own GPU (LOCAL_RANK). The other ranks' prints go nowhere, so what a run says is
    rank 0's."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or distributed():
        return
    device = device or default_device()
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # "cuda" is now this process's GPU
    # a rank that finished its share waits for the slowest one (at the end of synthesis, or while
    # rank 0 evaluates): far longer than the default timeout of a collective
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=6))
    atexit.register(_close_process_group)   # after an error: a run that went well calls leave()
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def leave() -> None:
    """The end of a run that went well: every rank waits here until all are done (rank 0 may still
    be saving), so that none closes its connections while another still uses them."""
    if world_size() > 1:
        dist.barrier()
    _close_process_group()


def _close_process_group() -> None:
    if distributed():
        dist.destroy_process_group()


def distributed() -> bool:
    """Whether this process is in a process group (a process that never imported torch.distributed
    is not, and checking does not import it)."""
    return "torch.distributed" in sys.modules and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that logs, evaluates and saves."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank arrives here."""
    if world_size() > 1:
        dist.barrier()


def shard(items) -> list:
    """This rank's contiguous share of items; the shares differ in length by at most one, and in
    rank order they are items again."""
    n, r, w = len(items), rank(), world_size()
    return items[r * n // w:(r + 1) * n // w]


def all_reduce_sum(value):
    """A number, or a list of numbers, summed over the ranks (in float64: token counts stay exact)."""
    if world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def all_gather(value) -> list:
    """Every rank's value (any picklable object), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def on_main(function, *args):
    """function(*args) run by rank 0 alone (it may write files the others must not race on), its
    result handed to every rank; a UserError it raises stops every rank with the same message."""
    if world_size() == 1:
        return function(*args)
    result = error = None
    if is_main():
        try:
            result = function(*args)
        except UserError as e:
            error = str(e)
    box = [(result, error)]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise UserError(error)
    return result


@contextmanager
def main_first():
    """Rank 0 runs the block first (it may generate the toy world or fill a cache), then the other
    ranks, which read what it wrote; a UserError rank 0 meets there stops every rank with its message."""
    if world_size() == 1:
        yield
        return
    box = [None]
    if is_main():
        try:
            yield
        except UserError as e:
            box = [str(e)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    if not is_main():
        yield


def data_parallel(model):
    """model in DistributedDataParallel, which averages the gradients over the ranks during
    backward; with one process, the model itself."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    on_gpu = next(model.parameters()).is_cuda
    # no buffer sync before each forward: the buffers (rotary frequencies) are constants
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None,
                                   forward_sync_buffers=False)


@contextmanager
def data_parallel_pass(policy, model, sync=True):
    """Inside the block the policy runs model (data_parallel's wrapper of policy.model), so the
    backward there averages the gradients over the ranks; sync=False keeps them local to add up
    (all micro-batches of a step but the last). With one process nothing changes."""
    if model is policy.model:
        yield
        return
    own, policy.model = policy.model, model
    try:
        with nullcontext() if sync else model.no_sync():
            yield
    finally:
        policy.model = own


def sum_gradients(params) -> None:
    """Each parameter's gradient summed over the ranks, for losses each rank divided by a global
    count; a rank that ran no backward adds zeros."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


@dataclass(frozen=True)
class Anomaly:
    image: Path
    mask: Path
    category: str
    anomaly_type: str


@dataclass
class Dataset:
    """One interface over the toy world, MVTec-AD and VisA.

    train_categories feed trajectories and RL, eval_categories feed synthesis and evaluation; in the
    toy world they are disjoint, as VisA (training) and MVTec-AD (evaluation) are in the paper."""
    name: str
    root: Path
    image_size: int
    kinds: dict            # category -> "texture" | "object"
    train_good: dict       # category -> [Path]
    test_good: dict        # category -> [Path]
    anomalies: dict        # category -> [Anomaly]
    train_categories: list
    eval_categories: list
    knowledge_types: dict = None   # category -> the types knowledge.json describes for it
    fixed_pose: dict = None        # category -> photographed in a fixed pose (knowledge.json "pose")

    @property
    def categories(self):
        return sorted(self.train_good)

    def types(self, category):
        return sorted({a.anomaly_type for a in self.anomalies[self.check_category(category)]})

    def synthesis_types(self, category):
        """The types that can be synthesized on the category: those with real examples on disk and
        those the knowledge base describes (a category with normal images only has just the latter)."""
        known = (self.knowledge_types or {}).get(self.check_category(category), [])
        return sorted(set(self.types(category)) | set(known))

    def anomalies_of(self, category, anomaly_type):
        found = [a for a in self.anomalies[category] if a.anomaly_type == anomaly_type]
        return sorted(found, key=lambda a: a.image.name)

    def split(self, category, anomaly_type):
        """The evaluation split (docs/METHOD.md 7): anomalies sorted by file name, the first third (rounded
        up) are few-shot references, the rest is the test set."""
        found = self.anomalies_of(category, anomaly_type)
        n_ref = (len(found) + 2) // 3
        return found[:n_ref], found[n_ref:]

    def check_category(self, category):
        if category not in self.train_good:
            raise UserError(f"unknown category '{category}' in {self.name}; known: "
                            f"{', '.join(self.categories)}")
        return category

    def load(self, path):
        return load_image(path, self.image_size)

    def load_mask(self, path):
        return load_mask(path, self.image_size)

    def load_anomaly(self, anomaly):
        """A real anomaly's image and mask; a mask of another size than its image is an error."""
        image_size, mask_size = image_size_of(anomaly.image), image_size_of(anomaly.mask)
        if image_size != mask_size:
            raise UserError(f"the mask {anomaly.mask} is {mask_size[0]}x{mask_size[1]} but its image "
                            f"{anomaly.image} is {image_size[0]}x{image_size[1]}")
        return self.load(anomaly.image), self.load_mask(anomaly.mask)


def load_dataset(name, root=None, size=None, seed=0, categories=None) -> Dataset:
    """--data toy|mvtec|visa|images: the toy world is generated on first use and cached under data/toy;
    images is a plain folder of one category's normal photos, named by categories (one name; default:
    the folder's name)."""
    if size is not None and size < 32:
        raise UserError(f"--size must be at least 32 pixels, not {size}")
    if root is not None and Path(root).exists() and not Path(root).is_dir():
        raise UserError(f"--data-root {root} is a file, not a folder")
    if name == "toy":
        size = size or 128
        root = Path(root) if root else HERE / "data" / "toy" / f"{size}px-seed{seed}"
        dataset = _toy_dataset(root, size, seed)
    elif name not in ("mvtec", "visa", "images"):
        raise UserError(f"--data must be toy, mvtec, visa or images, not '{name}'")
    elif root is None:
        raise UserError(f"--data {name} needs --data-root PATH "
                        + ("(a folder of normal photos)" if name == "images" else "(the unpacked dataset)"))
    elif not Path(root).is_dir():
        raise UserError(f"--data-root {root} does not exist or is not a folder")
    elif name == "images":
        dataset = _images_dataset(Path(root), size or 256, categories)
    else:
        dataset = (_mvtec_dataset if name == "mvtec" else _visa_dataset)(Path(root), size or 256)
    dataset.knowledge_types, dataset.fixed_pose = _from_knowledge(name, dataset.categories)
    return dataset


def _from_knowledge(dataset_name, categories) -> tuple:
    """category -> the types knowledge.json describes for it, and -> whether it is photographed in a
    fixed pose (the dataset's own entry first; an unknown category has no types and a free pose)."""
    kb, types, fixed = KnowledgeBase(), {}, {}
    for cat in categories:
        try:
            entry = kb._find_category(cat, dataset_name)[2]
        except KnowledgeError:
            entry = {"types": {}}
        types[cat], fixed[cat] = sorted(entry["types"]), entry.get("pose") == "fixed"
    return types, fixed


def _images_dataset(root, size, categories) -> Dataset:
    """A user's own normal photos, all in one folder: one category, no anomalies (so no references)."""
    photos = _images_in(root)
    if not photos:
        raise UserError(f"no images (.png, .jpg, .bmp) in {root}: --data images reads one folder of "
                        "normal photos")
    names = comma_list(categories, "--categories") if categories else [normalize_key(root.name)]
    if len(names) > 1:
        raise UserError("--data images reads one category: give --categories one name, e.g. screw")
    cat = names[0]
    try:
        kind = KnowledgeBase()._find_category(cat, None)[2]["kind"]
    except KnowledgeError:
        kind = "object"   # on a plain texture the foreground is found to be the whole image anyway
    return Dataset("images", root, size, {cat: kind}, {cat: photos}, {cat: []}, {cat: []}, [cat], [cat])


def _images_in(folder):
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")) if Path(folder).is_dir() else []


def _read_mvtec_layout(name, root, size, kinds, train_categories, eval_categories=None) -> Dataset:
    """<category>/train/good, <category>/test/<type>, <category>/ground_truth/<type>/<stem>_mask.png"""
    # a category with test anomalies but no normal images is still read: its anomalies are references
    categories = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir() or (p / "test").is_dir())
    if not categories:
        raise UserError(f"no categories under {root}: expected {root}/<category>/train/good/*.png "
                        "(the MVTec-AD layout)")
    train_good, test_good, anomalies = {}, {}, {}
    for cat in categories:
        train_good[cat] = _images_in(root / cat / "train" / "good")
        test_good[cat] = _images_in(root / cat / "test" / "good")
        anomalies[cat] = []
        for type_dir in sorted(p for p in (root / cat / "test").glob("*") if p.is_dir()):
            if type_dir.name == "good":
                continue
            for img in _images_in(type_dir):
                mask = root / cat / "ground_truth" / type_dir.name / f"{img.stem}_mask.png"
                if not mask.is_file():
                    raise UserError(f"missing mask {mask} for {img}")
                anomalies[cat].append(Anomaly(img, mask, cat, type_dir.name))
    kinds = {c: kinds.get(c) or "object" for c in categories}
    return Dataset(name, root, size, kinds, train_good, test_good, anomalies,
                   [c for c in train_categories if c in categories] or categories,
                   [c for c in (eval_categories or categories) if c in categories] or categories)


def _mvtec_dataset(root, size):
    kb = KnowledgeBase()
    kinds = {c: e["kind"] for c, e in kb.data["mvtec"].items()}
    return _read_mvtec_layout("mvtec", root, size, kinds, train_categories=[])


def _visa_dataset(root, size) -> Dataset:
    """VisA as published: split_csv/1cls.csv lists every image (object, split, label, image, mask)
    and <object>/image_anno.csv names the defect type(s) of each anomaly image."""
    import csv
    split_csv = root / "split_csv" / "1cls.csv"
    if not split_csv.is_file():
        raise UserError(f"{split_csv} not found: --data visa expects VisA as published, with "
                        "split_csv/1cls.csv and <object>/image_anno.csv")
    with open(split_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"object", "split", "label", "image", "mask"}
    if not rows or not need <= set(rows[0]):
        raise UserError(f"{split_csv} must have the columns {', '.join(sorted(need))}")
    type_of = {}
    for cat in sorted({r["object"] for r in rows}):
        anno = root / cat / "image_anno.csv"
        if not anno.is_file():
            raise UserError(f"{anno} not found: VisA names each anomaly's defect type there")
        with open(anno, newline="") as f:
            for r in csv.DictReader(f):
                if not {"image", "label"} <= set(r):
                    raise UserError(f"{anno} must have the columns image, label")
                if r["label"] != "normal":
                    if not (r["label"] or "").strip():
                        raise UserError(f"{anno}: the anomaly {r['image']} has no label")
                    type_of[r["image"]] = _visa_type(r["label"])
    train_good, test_good, anomalies = {}, {}, {}
    for r in rows:
        cat = r["object"]
        for d in (train_good, test_good, anomalies):
            d.setdefault(cat, [])
        image = root / r["image"]
        if r["label"] == "normal":
            (train_good if r["split"] == "train" else test_good)[cat].append(image)
        elif r["label"] == "anomaly":
            if r["image"] not in type_of:
                raise UserError(f"{r['image']} is an anomaly in {split_csv} but has no label in "
                                f"{root / cat / 'image_anno.csv'}")
            anomalies[cat].append(Anomaly(image, root / r["mask"], cat, type_of[r["image"]]))
        else:
            raise UserError(f"{split_csv}: label must be normal or anomaly, not '{r['label']}'")
    cats = sorted(train_good)
    return Dataset("visa", root, size, {c: "object" for c in cats}, train_good, test_good,
                   anomalies, cats, cats)


def _visa_type(label):
    """'chunk of wax missing' -> 'chunk_of_wax_missing'; several defects on one image -> 'combined'."""
    labels = [l for l in re.split(r"[,;]", label) if l.strip()]
    return "combined" if len(labels) > 1 else normalize_key(labels[0])


# ---- the toy world ---------------------------------------------------------------------------
# Procedural inspection images in MVTec-AD's layout: textures and objects with lighting gradients,
# sensor noise and pose changes, and physically motivated defects with pixel-exact masks. The defect
# renderer here is independent of the image-generation tool's painter (section 3), so an agent
# trained on these anomalies learns to synthesize defects, not to copy the painter.

TOY_COUNTS = {"train_good": 20, "test_good": 10, "per_type": 15}



def _toy_dataset(root, size, seed) -> Dataset:
    manifest = root / "toy.json"
    if manifest.is_file():
        try:
            made = json.loads(manifest.read_text())
        except ValueError:
            raise UserError(f"{manifest} is corrupt; delete {root} to generate the toy world again") from None
        if (made["size"], made["seed"]) != (size, seed):
            raise UserError(f"{root} holds the toy world at size {made['size']}, seed {made['seed']}; "
                            f"pass --size {made['size']} or another --data-root")
    elif root.exists() and any(root.iterdir()):
        raise UserError(f"{root} is not a toy world (no toy.json) and is not empty; pass an empty "
                        "or new --data-root to generate one there")
    else:
        try:
            generate_toy_world(root, size, seed)
        except (OSError, RuntimeError) as e:
            raise UserError(f"cannot generate the toy world in {root}: {e}") from None
    kinds = {c: s["kind"] for c, s in TOY_CATEGORIES.items()}
    groups = {g: [c for c, s in TOY_CATEGORIES.items() if s["group"] == g] for g in ("train", "eval")}
    return _read_mvtec_layout("toy", root, size, kinds, groups["train"], groups["eval"])


def generate_toy_world(root, size=128, seed=0, counts=TOY_COUNTS, categories=None) -> None:
    """Write the toy world to root (into a temporary folder first, renamed when complete)."""
    from tqdm import tqdm
    root = Path(root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    categories = categories or list(TOY_CATEGORIES)
    jobs = [(c, split, t) for c in categories
            for split, t in [("train", "good"), ("test", "good")] + [("test", t) for t in TOY_CATEGORIES[c]["types"]]]
    for cat, split, label in tqdm(jobs, desc=f"toy world -> {root}", leave=False):
        n = counts[f"{split}_good"] if label == "good" else counts["per_type"]
        rng = np.random.default_rng([seed, stable_seed(cat, split, label)])
        for i in range(n):
            image, foreground = render_normal(cat, rng, size)
            if label == "good":
                save_png(image, tmp / cat / split / "good" / f"{i:03d}.png")
                continue
            image, mask = render_anomaly(cat, label, image, foreground, rng)
            save_png(image, tmp / cat / "test" / label / f"{i:03d}.png")
            save_png(mask, tmp / cat / "ground_truth" / label / f"{i:03d}_mask.png")
    (tmp / "toy.json").write_text(json.dumps({"size": size, "seed": seed, "counts": counts,
                                              "categories": categories}, indent=1))
    if root.exists():
        root.rmdir()   # only ever an empty folder: a toy world is never written over other files
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)


@dataclass
class Task:
    """One synthesis job: a normal image, its category and the anomaly type to put on it."""
    id: str
    category: str
    anomaly_type: str
    image: np.ndarray
    kind: str                 # texture | object
    dataset: str = "toy"
    seed: int = 0
    image_path: str = ""


def plan_tasks(dataset, categories=None, types=None, per_type=5, seed=0) -> list:
    """Which normal image gets which anomaly type: per (category, type), per_type tasks on the
    category's normal training images (a seeded order). categories and types are comma lists or
    None (the evaluation group; every type on disk or in the knowledge base). A category without
    normal images is skipped with a notice; a type the knowledge base does not know is accepted with
    one (the tools then guess its family from its name)."""
    categories = dataset.eval_categories if categories is None else comma_list(categories, "--categories")
    types = None if types is None else comma_list(types, "--types")
    for cat in categories:
        dataset.check_category(cat)
    usable = [c for c in categories if dataset.train_good[c]]
    for cat in categories:
        if cat not in usable:
            print(f"note: {cat} has no normal images (expected in {dataset.root / cat / 'train' / 'good'}); skipped")
    if not usable:
        raise UserError(f"no normal images to synthesize on in {', '.join(categories)} of {dataset.root}")
    known = {t for c in usable for t in dataset.synthesis_types(c)}
    for t in types or []:
        if t not in known:
            print(f"note: knowledge retrieval has nothing for '{t}' on {', '.join(usable)}; the tools "
                  "guess its family from its name")
    plan = []
    for cat in usable:
        chosen = [t for t in dataset.synthesis_types(cat) if types is None or t in types] \
            + [t for t in types or [] if t not in known]
        if not chosen:
            raise UserError(f"none of --types {','.join(types)} exists for {cat}; known: "
                            f"{', '.join(dataset.synthesis_types(cat))}" if types else
                            f"{cat} has no anomaly types on disk or in knowledge.json; name some with --types")
        normals = dataset.train_good[cat]
        order = np.random.default_rng(stable_seed(seed, cat)).permutation(len(normals))
        for t in chosen:
            for i in range(per_type):
                plan.append(dict(id=f"{cat}/{t}/{i:03d}", category=cat, anomaly_type=t,
                                 path=normals[order[i % len(normals)]], seed=stable_seed(seed, cat, t, i)))
    return plan


def comma_list(text, flag) -> list:
    """'a, b,,a' -> ['a', 'b']; an empty list is an error naming the flag."""
    items = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not items:
        raise UserError(f"{flag} is empty")
    return items


def make_task(dataset, planned) -> "Task":
    return Task(id=planned["id"], category=planned["category"], anomaly_type=planned["anomaly_type"],
                image=dataset.load(planned["path"]), kind=dataset.kinds[planned["category"]],
                dataset=dataset.name, seed=planned["seed"], image_path=str(planned["path"]))


# ---- reverse synthesis and the few-shot references ----------------------------------------------
# A real anomaly's clean counterpart (the defect removed) is what reverse synthesis starts from
# (build_trajectories.py), and what the references are measured against: the judge compares a
# candidate with its normal image, so a reference must be measured the same way.

def exemplar_fill(image, mask) -> np.ndarray:
    """Exemplar fill: cover the (slightly grown) defect with the shifted copy of the image whose
    surroundings match the defect's surroundings best. Pixels away from the defect are untouched."""
    h, w = mask.shape
    hole = ndimage.binary_dilation(mask, iterations=2)
    ring = ndimage.binary_dilation(hole, iterations=3) & ~hole
    hy, hx = np.nonzero(hole)
    ry, rx = np.nonzero(ring)
    img = image.astype(np.float32)
    best, best_cost = None, np.inf
    reach = max(h, w) // 2
    step = max(1, reach // 24)
    for dy in range(-reach, reach + 1, step):
        for dx in range(-reach, reach + 1, step):
            if abs(dy) + abs(dx) == 0:
                continue
            sy, sx = hy + dy, hx + dx
            if sy.min() < 0 or sx.min() < 0 or sy.max() >= h or sx.max() >= w or hole[sy, sx].any():
                continue
            ty, tx = np.clip(ry + dy, 0, h - 1), np.clip(rx + dx, 0, w - 1)
            cost = np.abs(img[ty, tx] - img[ry, rx]).mean()
            if cost < best_cost:
                best, best_cost = (dy, dx), cost
    if best is None:
        raise UserError("a defect covers too much of the image to be removed")
    clean = image.copy()
    clean[hy, hx] = image[hy + best[0], hx + best[1]]
    return clean


ALIGN_SIDE = 64                         # the pose search runs at 64 px: fast, and fine enough for a shift
ALIGN_SHIFTS = range(-4, 5)             # shifts at 64 px (+-4 px: +-6% of the side)
ALIGN_ANGLES = (-4.0, -2.0, 0.0, 2.0, 4.0)   # rotations in degrees
ALIGN_NORMALS = 8                       # normal images searched per anomaly
FEATHER = 2.0                           # pixels over which the aligned patch blends into the image


def _small(image):
    return np.asarray(Image.fromarray(image).resize((ALIGN_SIDE, ALIGN_SIDE), Image.BILINEAR), np.float32)


def _warp(image, angle, dy, dx):
    """image rotated about its centre by angle degrees, then shifted by (dy, dx) pixels."""
    out = ndimage.rotate(image.astype(np.float32), angle, axes=(0, 1), reshape=False, order=1, mode="nearest") \
        if angle else image.astype(np.float32)
    return ndimage.shift(out, (dy, dx, 0), order=1, mode="nearest") if (dy or dx) else out


def align(target, source, ignore=None):
    """The (angle, dy, dx) in full-resolution pixels that best lays source over target, and the mean
    residual (grey levels) outside ignore: a small search over rotations and shifts at ALIGN_SIDE,
    then the shift refined pixel by pixel at full resolution."""
    t, s = _small(target), _small(source)
    keep = np.ones(t.shape[:2], bool) if ignore is None else \
        np.asarray(Image.fromarray(ignore.astype(np.uint8) * 255).resize(t.shape[1::-1])) == 0
    m = ALIGN_SHIFTS.stop - 1
    keep[:m], keep[-m:], keep[:, :m], keep[:, -m:] = False, False, False, False   # rolled-in borders
    best = (np.inf, 0.0, 0, 0)
    for angle in ALIGN_ANGLES:
        rotated = _warp(s, angle, 0, 0)
        for dy in ALIGN_SHIFTS:
            for dx in ALIGN_SHIFTS:
                cost = float(np.abs(np.roll(rotated, (dy, dx), axis=(0, 1)) - t)[keep].mean())
                if cost < best[0]:
                    best = (cost, angle, dy, dx)
    side = target.shape[0]
    scale = side / ALIGN_SIDE
    _, angle, dy, dx = best
    rotated, target = _warp(source, angle, 0, 0), target.astype(np.float32)
    keep = np.ones(target.shape[:2], bool) if ignore is None else ~ignore
    border = int(np.ceil((m + 1) * scale))
    keep[:border], keep[-border:], keep[:, :border], keep[:, -border:] = False, False, False, False
    reach = int(np.ceil(scale / 2))
    refined = min((float(np.abs(np.roll(rotated, (y, x), axis=(0, 1)) - target)[keep].mean()), y, x)
                  for y in range(round(dy * scale) - reach, round(dy * scale) + reach + 1)
                  for x in range(round(dx * scale) - reach, round(dx * scale) + reach + 1))
    return angle, refined[1], refined[2], refined[0]


def aligned_fill(image, mask, normals) -> tuple:
    """The masked region (grown and feathered) taken from the best-aligned normal image, its colour
    matched to the image around the defect. Returns the clean image and the mean difference between
    the image and the aligned normal just around the defect (grey levels)."""
    grown = ndimage.binary_dilation(mask, iterations=2)
    fits = [(align(image, normal, ignore=grown), normal) for normal in normals[:ALIGN_NORMALS]]
    (angle, dy, dx, _), normal = min(fits, key=lambda f: f[0][3])
    patch = _warp(normal, angle, dy, dx)
    ring = ndimage.binary_dilation(grown, iterations=3) & ~grown
    patch *= image[ring].astype(np.float32).mean(0) / np.maximum(patch[ring].mean(0), 1.0)   # the same light
    alpha = np.clip(ndimage.gaussian_filter(grown.astype(np.float32), FEATHER) * 2, 0, 1)
    alpha[grown] = 1.0
    clean = image * (1 - alpha[..., None]) + patch * alpha[..., None]
    residual = float(np.abs(patch[ring] - image[ring]).mean())
    return np.clip(np.round(clean), 0, 255).astype(np.uint8), residual


def clean_counterpart(image, mask, kind, normals=(), fixed_pose=False) -> tuple:
    """A real anomaly with its defect removed (reverse synthesis), and how. On an object photographed
    in a fixed pose (knowledge.json's "pose"), the best-aligned normal image shows what belongs under
    the defect (a bottle's rim, a cable's wire), which no other part of the same image does. On a
    texture, an object that turns freely, or without normal images: exemplar fill.
    Returns (clean, "aligned" | "exemplar")."""
    if kind == "object" and fixed_pose and len(normals):
        return aligned_fill(image, mask, normals)[0], "aligned"
    return exemplar_fill(image, mask), "exemplar"


def normal_residual(normals, mask) -> float | None:
    """How much two normal images of a category differ inside a region once aligned (grey levels):
    the variation a clean counterpart's fill cannot be expected to beat."""
    if len(normals) < 2:
        return None
    angle, dy, dx, _ = align(normals[0], normals[1])
    return float(np.abs(_warp(normals[1], angle, dy, dx) - normals[0])[mask].mean())


REFERENCE_TONE_GREY = 4.0   # a luminance change inside the defect smaller than this has no tone
REFERENCE_WHERE = 0.75      # share of references that must touch the outline (or all but this share
                            # must stay off it) for the place to count as "edge" (or "interior")
REFERENCE_HUE = 0.6         # the references agree on a hue when their mean chroma keeps 60% of its length
CALIBRATION_CACHE = Path("runs") / "calibration"
CALIBRATION_VERSION = 5     # bump when the measurements change, so old caches are not reused


def measure_reference(clean, image, mask, kind) -> dict:
    """What a real defect shows against its clean counterpart, in the judge's own measurements:
    size (longest side of the mask / image side), elongation, the share on the object and whether it
    touches the object's outline (of the mask grown by the 2 pixels the fill and the judge's blur
    add), the mean luminance change (tone), the mean absolute change (contrast) and the edges'
    steepness inside the mask."""
    fg = foreground_mask(clean, kind)
    solid = ndimage.binary_fill_holes(fg)
    outline = ndimage.binary_dilation(solid & ~ndimage.binary_erosion(solid),
                                      iterations=max(1, round(2 * mask.shape[0] / 128)))
    grown = ndimage.binary_dilation(mask, iterations=2)
    depth = ndimage.distance_transform_edt(fg)
    change = change_map(clean, image)
    return {"extent": extent_px(mask) / mask.shape[0], "elongation": elongation(mask),
            "touches_outline": bool((grown & outline).any()), "on_object": float(fg[grown].mean()),
            "deep": float(np.mean(depth[grown] >= 2 * mask.shape[0] / 128)),
            "tone": float(luminance(image)[mask].mean() - luminance(clean)[mask].mean()),
            "contrast": float(change[mask].mean()), "steepness": contour_steepness(change, mask),
            "chroma": (image[mask] - image[mask].mean(axis=1, keepdims=True)).mean(0).tolist()}


def summarize_references(measured, kind) -> dict:
    """The expectations the judge takes from a (category, type)'s references: ranges of size and
    elongation, the place relative to the object, a tone when every reference agrees on one, and the
    contrast of the faintest and of the median reference."""
    touching = np.mean([m["touches_outline"] for m in measured])
    # interior as the judge measures it: nearly all of the defect a few pixels inside the object
    deep = min(m["deep"] for m in measured)
    where = ("anywhere" if kind == "texture" else "edge" if touching >= REFERENCE_WHERE
             else "interior" if touching <= 1 - REFERENCE_WHERE and deep >= 0.95 else "anywhere")
    tones = [m["tone"] for m in measured]
    tone = ("darker" if max(tones) < -REFERENCE_TONE_GREY else
            "brighter" if min(tones) > REFERENCE_TONE_GREY else None)
    contrasts = [m["contrast"] for m in measured]
    # a hue when the references agree on one: their mean colour (less its grey) keeps most of its length
    chromas = np.array([m["chroma"] for m in measured], np.float32)
    mean_chroma = chromas.mean(0)
    agree = np.linalg.norm(mean_chroma) >= max(REFERENCE_HUE * np.linalg.norm(chromas, axis=1).mean(), 10.0)
    return {"n": len(measured), "where": where, "tone": tone,
            "extent": [min(m["extent"] for m in measured), max(m["extent"] for m in measured)],
            "elongation": [min(m["elongation"] for m in measured), max(m["elongation"] for m in measured)],
            "tone_grey": float(min(abs(t) for t in tones)),
            "on_object": float(min(m["on_object"] for m in measured)),
            "steepness": max([m["steepness"] for m in measured if m["steepness"] is not None], default=0.0),
            "contrast": [float(min(contrasts)), float(np.median(contrasts))],
            "chroma": mean_chroma.tolist() if agree else None}


def reference_stats(dataset, categories, cache=CALIBRATION_CACHE) -> dict:
    """"category/type" -> summarize_references of the type's few-shot references (the first third of
    its sorted anomalies, docs/METHOD.md 7; never the test two thirds), for the given categories.
    Computed once per dataset and cached in cache/<dataset>-<hash>.json (the hash covers the root,
    the image size and the measurements' version); a type without references has no entry, and the
    judge falls back to knowledge.json."""
    key = f"{CALIBRATION_VERSION}|{dataset.name}|{dataset.root.resolve()}|{dataset.image_size}"
    path = Path(cache) / f"{dataset.name}-{stable_seed(key):08x}.json"
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):   # none yet, or cut short: measured again
        stats = {}
    missing = [(c, t) for c in categories for t in dataset.types(c) if f"{c}/{t}" not in stats]
    for cat, t in missing:
        measured = []
        normals = [dataset.load(p) for p in dataset.train_good[cat][:ALIGN_NORMALS]]
        for anomaly in dataset.split(cat, t)[0]:
            image, mask = dataset.load_anomaly(anomaly)
            if mask.any():
                clean, _ = clean_counterpart(image, mask, dataset.kinds[cat], normals, dataset.fixed_pose[cat])
                measured.append(measure_reference(clean, image, mask, dataset.kinds[cat]))
        if measured:
            stats[f"{cat}/{t}"] = summarize_references(measured, dataset.kinds[cat])
    if missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(stats, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass   # an unwritable cache only costs the measuring next time
    return {k: v for k, v in stats.items() if k.split("/")[0] in categories}


# ==============================================================================================
# 2. Knowledge
# ==============================================================================================

def normalize_key(text) -> str:
    """'Metal Nut' / 'metal-nut' / 'metal_nut' -> 'metal_nut'."""
    return re.sub(r"[\s\-_]+", "_", str(text).strip().lower()).strip("_")


class KnowledgeError(Exception):
    pass


class KnowledgeBase:
    """What each defect looks like on each object, where it occurs and why (knowledge.json).

    Entries are keyed dataset -> category -> type. Lookups tolerate case, spacing and underscores,
    and prefer the task's own dataset, since the toy world reuses some MVTec-AD category names."""

    def __init__(self, path=HERE / "knowledge.json"):
        try:
            self.data = json.loads(Path(path).read_text())["datasets"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read the knowledge base {path}: {e}") from None

    def _find_category(self, category, dataset=None):
        want = normalize_key(category).replace("_", "")
        order = sorted(self.data, key=lambda d: d != dataset)
        for ds in order:
            for cat, entry in self.data[ds].items():
                if cat.replace("_", "") == want:
                    return ds, cat, entry
        raise KnowledgeError(f"unknown item '{category}'; known items: "
                             + ", ".join(sorted({c for d in self.data.values() for c in d})))

    def lookup(self, category, anomaly_type, dataset=None) -> dict:
        """The entry for (category, type), with the category's kind, object and part merged in."""
        ds, cat, entry = self._find_category(category, dataset)
        want = normalize_key(anomaly_type).replace("_", "")
        for name, t in entry["types"].items():
            if name.replace("_", "") == want:
                return {"dataset": ds, "category": cat, "type": name, "kind": entry["kind"],
                        "object": entry["object"], **t}
        raise KnowledgeError(f"unknown anomaly type '{anomaly_type}' for {cat}; known types: "
                             + ", ".join(sorted(entry["types"])))

    def context(self, category, anomaly_type, dataset=None) -> str:
        entry = self.lookup(category, anomaly_type, dataset)
        low, high = entry["attributes"]["extent"]
        return (f"{entry['type'].replace('_', ' ')} on {entry['object']}: {entry['description']} "
                f"Where: {entry['location']} Cause: {entry['cause']} To synthesize it: {entry['synthesis']} "
                f"Typical size: {low:.0%}-{high:.0%} of the image side.")

# ==============================================================================================
# 3. The tools: schemas, backend interfaces, the toolbox and the per-episode session
# ==============================================================================================
# Each tool is served by a backend that implements one small interface below; a new backend (a
# diffusion editor, a vision-language judge, an HTTP endpoint) is one class with that method. The
# offline backends of toy_world.py are the defaults. A backend raises ToolError (from toy_world.py)
# for a request it cannot serve; the runner shows the agent that error instead of a result.
#
# `entry` is a knowledge entry as KnowledgeBase.lookup returns it (or guessed for an unknown type):
# keys "type", "object", "kind" (texture | object) and "attributes" (shape, extent, tone, colour,
# where, edge, part), plus "description", "location", "cause", "synthesis" when the base knows it.

class PromptWriter(Protocol):
    """PG: a local-edit prompt for putting the entry's defect on the normal image."""
    def write(self, normal: np.ndarray, entry: dict, rng: np.random.Generator) -> str: ...


class ImageEditor(Protocol):
    """IG: the image edited as the prompt says (HxWx3 uint8, the input's size). region, when the agent
    gives one, is an [x0, y0, x1, y1] box the edit must stay inside; kind is texture | object.
    expected, where the dataset has references of the task's type, is what they show
    (summarize_references: "extent" as a share of the side, "where" on the object): an editor that
    leaves details to chance draws those the prompt leaves open from it."""
    def edit(self, image: np.ndarray, prompt: str, kind: str, rng: np.random.Generator,
             region=None, expected=None) -> np.ndarray: ...


class Judge(Protocol):
    """QE: how well the candidate shows the entry's defect on the normal image. Returns a dict with
    "score" (0-10, the pass mark is PASS_SCORE) and "review" (prose); the paper's rubric adds
    "location_score" (0-5) and "quality_score" (0-5), with score their sum; and optionally "advice":
    the review's fixes as data (keys as MeasuredJudge documents them), which a scripted policy can
    act on. A judge that writes only prose leaves the advice out."""
    def evaluate(self, normal: np.ndarray, candidate: np.ndarray, kind: str, entry: dict) -> dict: ...


class Segmenter(Protocol):
    """MG: the HxW bool mask of the defect, from the normal image and the edited one."""
    def segment(self, normal: np.ndarray, edited: np.ndarray) -> np.ndarray: ...


class CallError(ToolError):
    """A malformed call (unknown or disabled tool, missing argument): also a format error."""


class BackendError(ToolError):
    """A model backend failed (network, HTTP status, a reply that is not the asked JSON, a library
    error): the agent sees it like any tool error, the Toolbox counts it, RL drops a failed judgement.
    status: the HTTP status when a server answered with one."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class BackendDown(UserError):
    """A backend failed MAX_BACKEND_ERRORS times in a row: the run stops with one line."""


TOOL_NAMES = {"PG": "prompt_gen", "IG": "image_gen", "QE": "quality_eval",
              "KR": "knowledge_retrieval", "MG": "mask_gen"}


def parse_tools_flag(text) -> list:
    """--tools PG,IG,QE,MG (short or full names) -> full tool names; image_gen is always needed."""
    names = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name = TOOL_NAMES.get(item.upper(), item)
        if name not in TOOL_NAMES.values():
            raise UserError(f"--tools: unknown tool '{item}'; use some of {','.join(TOOL_NAMES)}")
        names.append(name)
    if "image_gen" not in names:
        raise UserError("--tools must include IG (image_gen): without it nothing is synthesized")
    return [n for n in TOOL_NAMES.values() if n in names]


TOOL_SCHEMAS = {
    "prompt_gen": {
        "description": "Write a local-edit prompt for synthesizing the anomaly on the normal image.",
        "parameters": {"image": ("integer", "index of the normal image, 1"),
                       "item_name": ("string", "the object category, e.g. hazelnut"),
                       "anomaly_type": ("string", "the defect type, e.g. hole")},
        "required": ["image", "item_name", "anomaly_type"]},
    "image_gen": {
        "description": "Edit the target image as the prompt says; returns the new image's index.",
        "parameters": {"prompt": ("string", "the local-edit instruction"),
                       "target_image": ("integer", "index of the image to edit; always 1, the original"),
                       "region": ("array", "optional [x0, y0, x1, y1] box in pixels to confine the edit")},
        "required": ["prompt", "target_image"]},
    "quality_eval": {
        "description": "Judge a synthesized anomaly: location 0-5 + quality 0-5 = score 0-10, and a review.",
        "parameters": {"anomaly_image": ("integer", "index of the image to judge"),
                       "item_name": ("string", "the object category"),
                       "anomaly_type": ("string", "the defect type")},
        "required": ["anomaly_image", "item_name", "anomaly_type"]},
    "knowledge_retrieval": {
        "description": "What this defect looks like on this object, where it occurs and why.",
        "parameters": {"item_name": ("string", "the object category"),
                       "anomaly_type": ("string", "the defect type")},
        "required": ["item_name", "anomaly_type"]},
    "mask_gen": {
        "description": "Binary mask of what changed between image 1 and the anomaly image.",
        "parameters": {"anomaly_image": ("integer", "index of the final anomaly image")},
        "required": ["anomaly_image"]},
}


def tool_spec(name) -> dict:
    """An OpenAI-style function spec, as the model sees it inside <tools>."""
    s = TOOL_SCHEMAS[name]
    props = {}
    for arg, (typ, desc) in s["parameters"].items():
        props[arg] = {"type": typ, "description": desc}
        if typ == "array":
            props[arg]["items"] = {"type": "number"}
    return {"type": "function", "function": {"name": name, "description": s["description"],
            "parameters": {"type": "object", "properties": props, "required": s["required"]}}}


# ---- model servers: any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp, hosted APIs) ------
# Used by the openai: backends and by a served policy. Only the standard library speaks HTTP here.

def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_data_url(image) -> str:
    """An HxWx3 (or HxW) uint8 image as a base64 PNG data URL, as chat APIs take images."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


class ModelServer:
    """One model on an OpenAI-compatible server, from a spec "openai:<base-url>#<model>".

    The API key is read once from the environment variable api_key_env (none: no Authorization
    header) and is sent only in that header: it is never part of the spec, repr, log or any error.
    Connection failures and 5xx / 429 replies are retried (retries times, with a growing wait);
    any failure after that is a ToolError whose message names the server and the status."""

    def __init__(self, spec, api_key_env="OPENAI_API_KEY", timeout=120.0, retries=2):
        if not spec.startswith("openai:") or "#" not in spec:
            raise UserError(f"'{spec}' is not an OpenAI-compatible endpoint: write openai:<base-url>#<model>")
        self.base_url, self.model = spec[len("openai:"):].rsplit("#", 1)
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")) or not self.model:
            raise UserError(f"'{spec}': the base URL must start with http:// or https:// and a model follow '#'")
        self._key = os.environ.get(api_key_env) or None
        self.timeout, self.retries = timeout, retries

    def __repr__(self):
        return f"ModelServer({self.base_url!r}, model={self.model!r})"

    def post(self, path, body: bytes, content_type="application/json") -> dict:
        """POST body to base_url + path and return the JSON reply."""
        headers = {"Content-Type": content_type}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        where, status = f"{self.base_url}{path}", None
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(where, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return json.loads(reply.read().decode("utf-8", "replace"))
            except urllib.error.HTTPError as e:
                problem, status = f"HTTP {e.code} {e.reason}", e.code
                if e.code not in (429, 500, 502, 503, 504):
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                problem = f"cannot reach the server ({getattr(e, 'reason', e)})"
            except ValueError:
                problem = "the reply is not JSON"
                break
            if attempt < self.retries:
                time.sleep(0.5 * 2 ** attempt)
        raise BackendError(f"{where}: {problem}", status)

    def chat(self, messages, **params) -> str:
        """The text of the model's reply to chat messages (OpenAI format; images as data URLs)."""
        reply = self.post("/chat/completions",
                          json.dumps({"model": self.model, "messages": messages, **params}).encode())
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.base_url}/chat/completions: a reply without choices[0].message") from None

    def post_form(self, path, fields, files) -> dict:
        """POST a multipart/form-data body: text fields, and files as {name: (filename, bytes)}."""
        boundary = f"----anomalyagent{os.urandom(8).hex()}"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                  f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n"
                  for k, (name, data) in files.items()]
        return self.post(path, b"".join(parts) + f"--{boundary}--\r\n".encode(),
                         f"multipart/form-data; boundary={boundary}")


# ---- real-model backends: vision-language judges and prompt writers, diffusion and served editors --
# Picked on the command line (add_backend_flags, make_toolbox below):
#   --pg offline | vlm:<hf-id-or-folder> | openai:<base-url>#<model>
#   --qe measured | vlm:<hf-id-or-folder> | openai:<base-url>#<model>
#   --ig procedural | diffusers:<hf-id-or-folder> | openai:<base-url>#<model>
#   --mg difference | edit-mask
# Every failure of a model (network, HTTP status, a reply that is not the asked JSON, a library
# error on an odd input, NaN pixels) is a BackendError: the agent sees an observation, never a
# traceback, and the Toolbox stops the run after MAX_BACKEND_ERRORS in a row.

# ---- the texts the model backends send: the paper's QE rubric and PG prompt, in our words ------
JUDGE_PROMPT = """You are a strict inspector of synthetic industrial defects. Image 1 shows \
{object}, free of defects. Image 2 is image 1 after an edit that should add one realistic \
"{defect}" defect.{description}

Score image 2 with this rubric (5: indistinguishable from a real defect; 0: a failure):
- location_score, 0-5: the defect lies on a physically plausible part of the item for a \
{defect}, follows the item's geometry, at a plausible size, not floating in the background nor \
spilling over unrelated regions.
- quality_score, 0-5: it is clearly visible and looks like a real {defect} (texture, scale, \
contrast, lighting), blends into the surface with nothing pasted-on, and the rest of the image is \
unchanged.
Then write a short review: what is wrong, and how the edit prompt should change.

Answer with JSON only: {{"location_score": <0-5>, "quality_score": <0-5>, "review": "<review>"}}"""

PROMPT_WRITER_PROMPT = """You write prompts for an image editor that synthesizes industrial \
defects. The image shows {object}, free of defects. Write one local-edit prompt that adds a \
realistic "{defect}" defect to it, in this form: "Using the provided image, change only <part> to \
introduce <the defect: shape, colour, size, texture>. Keep the rest of the image unchanged."

Answer with JSON only: {{"prompt": "<the prompt>"}}"""

JUDGE_SCHEMA = {"type": "object", "required": ["location_score", "quality_score", "review"],
                "properties": {"location_score": {"type": "number"}, "quality_score": {"type": "number"},
                               "review": {"type": "string"}}}
PROMPT_SCHEMA = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}
# ----------------------------------------------------------------------------------------------

MAX_BACKEND_ERRORS = 5   # backend failures in a row that stop a run
MAX_EDIT_SHARE = 0.5     # an editor that changes more of the image than this made no local edit


def first_line(error) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def parse_json_reply(text, required) -> dict:
    """The first JSON object with the required keys in a model's reply: thinking blocks, code
    fences and text around it are skipped."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S).split("</think>")[-1]
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict) and all(k in value for k in required):
            return value
    raise BackendError(f"the reply holds no JSON object with {', '.join(required)}: {text.strip()[:80]!r}")


class ServedChat:
    """A vision-language model on an OpenAI-compatible server: images as PNG data URLs, a
    JSON-schema response_format until the server refuses it (HTTP 400), then the prompt alone."""

    def __init__(self, server):
        self.server, self.structured = server, True
        self.name = f"openai:{server.base_url}#{server.model}"

    def ask(self, images, text, schema, temperature=None) -> str:
        content = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
        params = {} if temperature is None else {"temperature": temperature}
        if self.structured:
            params["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        try:
            return self.server.chat([{"role": "user", "content": content + [{"type": "text", "text": text}]}],
                                    **params)
        except BackendError as e:
            if not (self.structured and e.status == 400):
                raise
            self.structured = False
            return self.ask(images, text, schema, temperature)


class LocalChat:
    """A transformers vision-language model (any Qwen-VL checkpoint) through the policy wrapper, greedy."""

    def __init__(self, source, flag, device="cpu", max_new_tokens=1024):
        self.name = f"vlm:{source}"
        self.model = VLMPolicy.load(source, device=device, flag=flag, temperature=0,
                                    max_new_tokens=max_new_tokens)

    def ask(self, images, text, schema, temperature=None) -> str:
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        try:
            return self.model.act([[{"role": "user", "content": content}]])[0]
        except Exception as e:   # whatever the model makes of an input is the tool's failure, not the run's
            raise BackendError(f"{self.name}: {type(e).__name__}: {first_line(e)}") from None


def ask_json(chat, images, text, schema, temperature=None) -> dict:
    """The reply's JSON object; an unparseable reply is asked once more, then is a BackendError."""
    for _ in range(2):
        try:
            return parse_json_reply(chat.ask(images, text, schema, temperature), schema["required"])
        except BackendError as e:
            if e.status is not None:   # the server's own failures were retried by ModelServer
                raise
            problem = e
    raise BackendError(f"{chat.name}: {problem}")


class ModelJudge:
    """QE backend: a vision-language model scores the edit with the paper's rubric (JUDGE_PROMPT),
    greedy; score = location_score + quality_score, each clamped to 0-5. It gives no advice data."""

    def __init__(self, chat):
        self.chat = chat

    def evaluate(self, normal, candidate, kind, entry) -> dict:
        known = f" What it looks like: {entry['description']}" if entry.get("description") else ""
        text = JUDGE_PROMPT.format(object=entry["object"], defect=entry["type"].replace("_", " "),
                                   description=known)
        reply = ask_json(self.chat, [normal, candidate], text, JUDGE_SCHEMA, temperature=0)
        try:
            location, quality = (float(reply[k]) for k in ("location_score", "quality_score"))
        except (TypeError, ValueError):
            raise BackendError(f"{self.chat.name}: the scores are not numbers") from None
        if not np.isfinite([location, quality]).all():
            raise BackendError(f"{self.chat.name}: the scores are not finite")
        location, quality = min(max(location, 0.0), 5.0), min(max(quality, 0.0), 5.0)
        return {"location_score": location, "quality_score": quality, "score": location + quality,
                "review": str(reply["review"])}


class ModelPromptWriter:
    """PG backend: a vision-language model writes the local-edit prompt (PROMPT_WRITER_PROMPT)
    from the normal image, the item and the type."""

    def __init__(self, chat):
        self.chat = chat

    def write(self, normal, entry, rng) -> str:
        text = PROMPT_WRITER_PROMPT.format(object=entry["object"], defect=entry["type"].replace("_", " "))
        prompt = ask_json(self.chat, [normal], text, PROMPT_SCHEMA)["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise BackendError(f"{self.chat.name}: the prompt is empty")
        return prompt.strip()


class PastingEditor:
    """What the model editors share: the output is resized to the input's size and, with paste-back,
    only the region the editor was allowed to change (its mask, or the changed components of a
    whole-image edit) is composited onto the original, feathered inwards, so nothing else drifts.
    Each output's allowed region is kept for MG's edit-mask."""

    def __init__(self, paste_back=True):
        self.paste_back, self.allowed = paste_back, {}

    def finish(self, image, edited, allowed=None, region=None) -> np.ndarray:
        """edited: the model's RGB output, uint8 or float 0-1, any size; allowed: HxW bool, or None
        for a whole-image edit."""
        edited = np.asarray(edited)
        if edited.dtype != np.uint8:
            if not np.isfinite(edited).all():
                raise BackendError(f"{self.name}: the editor returned non-finite pixels")
            edited = np.clip(np.round(edited * 255), 0, 255).astype(np.uint8)
        h, w = image.shape[:2]
        edited = np.asarray(Image.fromarray(edited).convert("RGB").resize((w, h), Image.LANCZOS))
        feather = max(2, round(h / 64))
        if allowed is None:   # a whole-image edit: what it changed, widened by the feather
            allowed = ndimage.binary_dilation(DifferenceSegmenter().segment(image, edited), iterations=feather)
        if region is not None:
            allowed = allowed & region_mask(region, (h, w))
        if allowed.mean() > MAX_EDIT_SHARE:
            raise ToolError(f"the editor changed {allowed.mean():.0%} of the image, more than half: not a "
                            "local edit; name one small place in the prompt, or give a region")
        if self.paste_back:
            alpha = np.clip(ndimage.distance_transform_edt(allowed) / feather, 0, 1)[..., None]
            edited = np.round(image * (1 - alpha) + edited * alpha).astype(np.uint8)
        self.allowed[hashlib.sha1(edited.tobytes()).hexdigest()] = allowed
        while len(self.allowed) > 256:   # the oldest edits' masks are no longer asked for
            self.allowed.pop(next(iter(self.allowed)))
        return edited

    def allowed_region(self, edited):
        return self.allowed.get(hashlib.sha1(np.ascontiguousarray(edited).tobytes()).hexdigest())


class DiffusersEditor(PastingEditor):
    """IG backend: a diffusers pipeline, of the class DiffusionPipeline.from_pretrained picks.
    An inpainting pipeline (one that takes mask_image: SD / SDXL inpainting, FLUX.2 klein or
    Qwen-Image-Edit inpainting) paints into the agent's region, or else into the footprint the
    procedural painter gives the prompt's place, size and shape words, widened and kept on the
    object. An instruction editor (InstructPix2Pix, FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 klein)
    edits the whole image. The model works at size x size pixels."""

    def __init__(self, source, steps=30, size=512, guidance=None, dtype="auto", offload=False,
                 device="cpu", paste_back=True):
        import inspect
        import diffusers
        super().__init__(paste_back)
        diffusers.utils.logging.set_verbosity_error()
        self.name, self.steps, self.size, self.guidance = f"diffusers:{source}", steps, size, guidance
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        dtype = dtypes.get(dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        try:
            self.pipe = diffusers.DiffusionPipeline.from_pretrained(source, dtype=dtype)
        except Exception as e:   # a missing folder, a wrong id, a non-diffusers folder: one line
            raise UserError(f"--ig {self.name}: cannot load a diffusers pipeline ({first_line(e)})") from None
        self.inputs = set(inspect.signature(self.pipe.__call__).parameters)
        if "image" not in self.inputs:
            raise UserError(f"--ig {self.name}: {type(self.pipe).__name__} makes images, it does not edit them")
        self.inpaints = "mask_image" in self.inputs
        self.pipe.enable_model_cpu_offload() if offload else self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.painter = ProceduralPainter()

    def edit(self, image, prompt, kind, rng, region=None, expected=None) -> np.ndarray:
        h, w = image.shape[:2]
        side = (self.size, self.size)
        call = {"prompt": prompt, "image": Image.fromarray(image).resize(side, Image.LANCZOS),
                "num_inference_steps": self.steps, "output_type": "np",
                "generator": torch.Generator().manual_seed(int(rng.integers(2 ** 31)))}
        call.update({k: v for k, v in (("height", self.size), ("width", self.size),
                                        ("guidance_scale", self.guidance)) if k in self.inputs and v is not None})
        mask = None
        if self.inpaints:
            if region is not None:
                mask = region_mask(region, (h, w))
            else:
                _, coverage = self.painter.footprint(image, prompt, kind, rng, expected=expected)
                mask = ndimage.binary_dilation(coverage > 0, iterations=max(2, round(h / 64))) \
                    & foreground_mask(image, kind)
            call["mask_image"] = Image.fromarray(mask.astype(np.uint8) * 255).resize(side, Image.NEAREST)
        try:
            with torch.no_grad():
                output = self.pipe(**call).images[0]
        except Exception as e:   # a library error on an odd input is the tool's failure, not the run's
            raise BackendError(f"{self.name}: {type(e).__name__}: {first_line(e)}") from None
        if isinstance(output, Image.Image):
            output = np.asarray(output.convert("RGB"))
        return self.finish(image, output, mask, region)


class ServedEditor(PastingEditor):
    """IG backend: POST <base-url>/images/edits, as vLLM-Omni, LiteLLM in front of Gemini's image
    model and OpenAI serve it; the whole image is edited, then pasted back as an instruction edit."""

    def __init__(self, server, paste_back=True):
        super().__init__(paste_back)
        self.server, self.name = server, f"openai:{server.base_url}#{server.model}"

    def edit(self, image, prompt, kind, rng, region=None, expected=None) -> np.ndarray:
        reply = self.server.post_form("/images/edits", {"model": self.server.model, "prompt": prompt, "n": "1",
                                                        "response_format": "b64_json"},
                                      {"image": ("image.png", png_bytes(image))})
        try:
            data = base64.b64decode(reply["data"][0]["b64_json"])
            output = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except (KeyError, IndexError, TypeError, ValueError, OSError):
            raise BackendError(f"{self.name}: the /images/edits reply holds no b64_json image") from None
        return self.finish(image, output, None, region)


class EditMaskSegmenter:
    """MG backend: the measured change, within the region the editor was allowed to change (the
    measured change alone for an edit the editor kept no region for, e.g. the procedural painter's)."""

    def __init__(self, editor):
        self.editor, self.measured = editor, DifferenceSegmenter()

    def segment(self, normal, edited) -> np.ndarray:
        mask = self.measured.segment(normal, edited)
        allowed = getattr(self.editor, "allowed_region", lambda image: None)(edited)
        return mask if allowed is None else mask & allowed


class Toolbox:
    """The enabled tools and one backend per tool (the offline ones unless given);
    `session(task)` gives the per-episode state."""

    def __init__(self, enabled=tuple(TOOL_NAMES.values()), knowledge=None, prompt_writer=None,
                 editor=None, judge=None, segmenter=None, references=None):
        self.enabled = list(enabled)
        self.references = references or {}   # "category/type" -> reference_stats, for the judge and the editor
        self.knowledge = knowledge or KnowledgeBase()
        self.prompt_writer: PromptWriter = prompt_writer or OfflinePromptWriter()
        self.editor: ImageEditor = editor or ProceduralPainter()
        self.judge: Judge = judge or MeasuredJudge()
        self.segmenter: Segmenter = segmenter or DifferenceSegmenter()
        self.backend_errors = {}   # tool -> its backend's failures in a row

    def count_backend_error(self, tool, error=None):
        """A failed call of the tool counts (error given), a served one resets its count;
        MAX_BACKEND_ERRORS failures of one tool's backend in a row stop the run."""
        self.backend_errors[tool] = self.backend_errors.get(tool, 0) + 1 if error else 0
        if self.backend_errors[tool] >= MAX_BACKEND_ERRORS:
            raise BackendDown(f"{tool}: {MAX_BACKEND_ERRORS} backend errors in a row, stopping; the last: {error}")

    def specs(self):
        return [tool_spec(n) for n in self.enabled]

    def session(self, task):
        return ToolSession(self, task)

    def entry(self, task, item_name=None, anomaly_type=None) -> dict:
        """Knowledge for the judge and the prompt writer; a type the base lacks gets guessed attributes."""
        item, defect = item_name or task.category, anomaly_type or task.anomaly_type
        try:
            entry = self.knowledge.lookup(item, defect, task.dataset)
        except KnowledgeError:
            entry = {"type": normalize_key(defect), "object": f"a {item}", "kind": task.kind,
                     "attributes": guess_attributes(defect)}
        # the dataset's own references of the task's type, where it has them (reference_stats)
        if (normalize_key(item), normalize_key(defect)) == (task.category, task.anomaly_type):
            reference = self.references.get(f"{task.category}/{task.anomaly_type}")
            if reference:
                entry["reference"] = reference
        return entry


# the backend settings that change what an episode gives (the key's variable and offload do not)
BACKEND_DEFAULTS = {"pg": "offline", "qe": "measured", "ig": "procedural", "mg": "difference", "ig_steps": 30,
                    "ig_size": 512, "ig_guidance": None, "ig_dtype": "auto", "paste_back": True, "references": "on"}
BACKEND_SETTINGS = tuple(BACKEND_DEFAULTS)


def add_backend_flags(parser):
    """The "tools" flag group every stage that plays episodes adds: a backend per tool."""
    g = parser.add_argument_group("tools (backends; README: With real models)")
    g.add_argument("--pg", default=BACKEND_DEFAULTS["pg"], help="prompt writer: offline | vlm:<hf-id-or-folder> | openai:<base-url>#<model>")
    g.add_argument("--qe", default=BACKEND_DEFAULTS["qe"], help="judge: measured | vlm:<hf-id-or-folder> | openai:<base-url>#<model>")
    g.add_argument("--ig", default=BACKEND_DEFAULTS["ig"], help="editor: procedural | diffusers:<hf-id-or-folder> | openai:<base-url>#<model>")
    g.add_argument("--mg", default=BACKEND_DEFAULTS["mg"], choices=["difference", "edit-mask"],
                   help="mask: the measured change, or only within the region the editor was allowed to change")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable that holds the openai: key")
    g.add_argument("--ig-steps", type=int, default=BACKEND_DEFAULTS["ig_steps"], help="diffusers: denoising steps")
    g.add_argument("--ig-size", type=int, default=BACKEND_DEFAULTS["ig_size"], help="diffusers: working size in pixels (output: the dataset's)")
    g.add_argument("--ig-guidance", type=float, default=BACKEND_DEFAULTS["ig_guidance"], help="diffusers: guidance scale (default: the pipeline's)")
    g.add_argument("--ig-dtype", default=BACKEND_DEFAULTS["ig_dtype"], choices=["auto", "float32", "bfloat16", "float16"],
                   help="diffusers: weight dtype (auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--ig-offload", action="store_true", help="diffusers: CPU offload (less GPU memory, slower)")
    g.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                   help="keep the editor's whole output, not only the edited region pasted onto the original")
    g.add_argument("--vlm-max-new-tokens", type=int, default=1024, help="vlm: longest reply of a local judge or writer")
    g.add_argument("--references", default=BACKEND_DEFAULTS["references"], choices=["on", "off"],
                   help="on: the offline judge expects, and the painter leaves to chance, what the dataset's few-shot "
                        "references (the first third of each type's anomalies) show; off: knowledge.json alone")


def make_toolbox(args, enabled=None, knowledge=None, dataset=None, categories=None) -> Toolbox:
    """The Toolbox with the backends add_backend_flags' flags name, for the enabled tools; with
    --references on, calibrated on the dataset's references of the categories (default: all)."""
    enabled = list(enabled or TOOL_NAMES.values())
    device = getattr(args, "device", None)

    def chat(spec, flag, default):
        if spec.startswith("vlm:"):
            return LocalChat(spec[len("vlm:"):], f"{flag} vlm:", device or default_device(), args.vlm_max_new_tokens)
        if spec.startswith("openai:"):
            return ServedChat(ModelServer(spec, args.api_key_env))
        raise UserError(f"{flag} {spec}: use {default}, vlm:<hf-id-or-folder> or openai:<base-url>#<model>")

    backends = {}
    if args.pg != "offline" and "prompt_gen" in enabled:
        backends["prompt_writer"] = ModelPromptWriter(chat(args.pg, "--pg", "offline"))
    if args.qe != "measured" and "quality_eval" in enabled:
        backends["judge"] = ModelJudge(chat(args.qe, "--qe", "measured"))
    if args.ig.startswith("diffusers:"):
        backends["editor"] = DiffusersEditor(args.ig[len("diffusers:"):], args.ig_steps, args.ig_size, args.ig_guidance,
                                             args.ig_dtype, args.ig_offload, device or default_device(),
                                             args.paste_back)
    elif args.ig.startswith("openai:"):
        backends["editor"] = ServedEditor(ModelServer(args.ig, args.api_key_env), args.paste_back)
    elif args.ig != "procedural":
        raise UserError(f"--ig {args.ig}: use procedural, diffusers:<hf-id-or-folder> or openai:<base-url>#<model>")
    if args.mg == "edit-mask":
        backends["segmenter"] = EditMaskSegmenter(backends.setdefault("editor", ProceduralPainter()))
    if dataset is not None and args.references == "on":
        backends["references"] = reference_stats(dataset, categories or dataset.categories)
    return Toolbox(enabled, knowledge, **backends)


ARGUMENT_TYPES = {"integer": "an integer", "string": "a string", "array": "a list of numbers"}


def json_kind(value) -> str:
    """What a JSON value is, for an error message: a scalar as written (true, 2.7), else its kind."""
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)[:20]
    return {str: "a string", list: "a list", dict: "an object"}[type(value)]


def fits_type(value, kind) -> bool:
    """Whether a JSON value is of a schema type. JSON's true and false are no numbers (in Python a
    bool is an int), and 2.7 is no image index."""
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int)
    if kind == "string":
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


class ToolSession:
    """The images of one episode (1 = the normal image, then each new one in order) and the tool
    calls made on them. call() returns the observation's JSON and the images it attaches."""

    def __init__(self, toolbox, task):
        self.box, self.task = toolbox, task
        self.images = [task.image]
        self.sources = ["normal"]          # normal | generated | mask, per image
        self.prompts = {}                  # image index -> the prompt that made it
        self.scores = {}                   # image index -> last QE result
        self.calls, self.rng = 0, None     # the rng of the call in progress

    def call(self, name, args):
        if name not in TOOL_SCHEMAS:
            raise CallError(f"unknown tool '{name}'; available: {', '.join(self.box.enabled)}")
        if name not in self.box.enabled:
            raise CallError(f"the tool '{name}' is switched off in this run; available: "
                            f"{', '.join(self.box.enabled)}")
        if not isinstance(args, dict):
            raise CallError("arguments must be a JSON object")
        missing = [a for a in TOOL_SCHEMAS[name]["required"] if a not in args]
        if missing:
            raise CallError(f"{name} is missing the argument(s) {', '.join(missing)}")
        for arg, (kind, _) in TOOL_SCHEMAS[name]["parameters"].items():
            if arg in args and not fits_type(args[arg], kind):
                raise CallError(f"{name}: {arg} must be {ARGUMENT_TYPES[kind]}, not {json_kind(args[arg])}")
        self.calls += 1
        self.rng = np.random.default_rng([self.task.seed, self.calls])   # each call its own draw
        try:
            served = getattr(self, name)(**{k: v for k, v in args.items() if k in TOOL_SCHEMAS[name]["parameters"]})
        except BackendError as e:
            self.box.count_backend_error(name, e)
            raise
        self.box.count_backend_error(name)
        return served

    def is_generated(self, k) -> bool:
        return isinstance(k, int) and 1 <= k <= len(self.images) and self.sources[k - 1] == "generated"

    def _image(self, k, want="generated") -> int:
        if not 1 <= k <= len(self.images):
            raise ToolError(f"there is no image {k}; images 1-{len(self.images)} exist")
        if want == "generated" and self.sources[k - 1] != "generated":
            raise ToolError(f"image {k} is the {self.sources[k - 1]} image, not a generated anomaly")
        return k

    def prompt_gen(self, image, item_name, anomaly_type):
        self._image(image, want="any")
        entry = self.box.entry(self.task, item_name, anomaly_type)
        return {"prompt": self.box.prompt_writer.write(self.images[0], entry, self.rng)}, []

    def image_gen(self, prompt, target_image, region=None):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ToolError("prompt must be a non-empty string")
        k = self._image(target_image, want="any")
        if self.sources[k - 1] == "mask":
            raise ToolError(f"image {k} is a mask; edit image 1, the original")
        expected = self.box.references.get(f"{self.task.category}/{self.task.anomaly_type}")
        return self.add_generated(self.box.editor.edit(self.images[k - 1], prompt, self.task.kind, self.rng, region,
                                                       expected), prompt)

    def add_generated(self, image, prompt):
        """Number a new generated image. build_trajectories.py also uses it to replay a real
        anomaly as the image a prompt produced."""
        self.images.append(image)
        self.sources.append("generated")
        self.prompts[len(self.images)] = prompt
        return {"image_index": len(self.images)}, [image]

    def quality_eval(self, anomaly_image, item_name, anomaly_type):
        # always judged as the task's defect: naming another item or type cannot buy a score
        k = self._image(anomaly_image)
        entry = self.box.entry(self.task)
        result = self.box.judge.evaluate(self.images[0], self.images[k - 1], self.task.kind, entry)
        self.scores[k] = result["score"]
        return {"image_index": k, **result}, []

    def knowledge_retrieval(self, item_name, anomaly_type):
        kb = self.box.knowledge
        try:
            entry = kb.lookup(item_name, anomaly_type, self.task.dataset)
            return {"context": kb.context(item_name, anomaly_type, self.task.dataset),
                    "attributes": entry["attributes"]}, []
        except KnowledgeError as e:
            raise ToolError(str(e)) from None

    def mask_gen(self, anomaly_image):
        k = self._image(anomaly_image)
        mask = self.box.segmenter.segment(self.images[0], self.images[k - 1])
        self.images.append(mask.astype(np.uint8) * 255)   # a grey image, like any picture the policy sees
        self.sources.append("mask")
        result = {"mask_index": len(self.images), "anomaly_image": k,
                  "area_fraction": round(float(mask.mean()), 4), "empty": not mask.any()}
        if not mask.any():
            result["message"] = f"no change was found between image 1 and image {k}"
        return result, [self.images[-1]]


def offline_notice(dataset_name, toolbox) -> str | None:
    """One line for the start of a run on real photos whose image editor or judge is an offline
    stand-in; None on the toy world (built for them) or when both are models."""
    offline = [name for name, backend, cls in (("image editor (a procedural painter)", toolbox.editor, ProceduralPainter),
                                               ("judge (image measurements)", toolbox.judge, MeasuredJudge))
               if isinstance(backend, cls)]
    if dataset_name == "toy" or not offline:
        return None
    return (f"note: the {' and the '.join(offline)} are offline stand-ins, not image or vision-language "
            f"models: on real photos they paint and measure simple shapes. Real models: --ig diffusers:<model> "
            f"or openai:<url>#<model>, --qe and --pg vlm:<model> or openai:<url>#<model> (README: With real models).")


# ==============================================================================================
# 4. The agent protocol
# ==============================================================================================

PASS_SCORE = 6.0   # DECISION (docs/METHOD.md 2): an image passes quality evaluation at score >= 6 of 10

SYSTEM_PROMPT = """You are AnomalyAgent, an industrial-inspection expert who synthesizes realistic \
defects on images of normal products, to train anomaly detectors.

Image 1 is a normal image of an item. Put one realistic anomaly of the requested type on it by \
calling tools, one per turn, then return the final image and its mask.

In every turn, first reason inside <thinking>...</thinking>, then either call exactly one tool:
<tool_call>{{"name": "<tool name>", "arguments": {{...}}}}</tool_call>
or, when you are done, answer:
<answer>{{"status": "success", "final_image_index": <k>, "mask_generated": true, \
"synthesis_logic": "<one sentence>"}}</answer>

Procedure: {procedure}

<tools>
{tools}
</tools>"""


def system_prompt(specs) -> str:
    """The instructions, the procedure for the tools this run has, and their schemas."""
    names = [s["function"]["name"] for s in specs]
    steps = ["get a prompt from prompt_gen;" if "prompt_gen" in names else "write an edit prompt;",
             "generate with image_gen, always editing image 1;"]
    if "quality_eval" in names:
        kr = " optionally call knowledge_retrieval," if "knowledge_retrieval" in names else ""
        steps.append(f"judge the result with quality_eval. If the score is below {PASS_SCORE:g}, "
                     f"read the review,{kr} rewrite the prompt yourself and generate again.")
    steps.append("When an image passes (or your attempts run out), call mask_gen on the best image, "
                 "then answer with its index." if "mask_gen" in names else
                 "Then answer with the best image's index.")
    steps.append("Images are numbered in order of appearance: 1 is the normal image, and every "
                 "image a tool makes gets the next number.")
    return SYSTEM_PROMPT.format(procedure=" ".join(steps),
                                tools="\n".join(json.dumps(s) for s in specs))


def user_message(task) -> dict:
    h, w = task.image.shape[:2]
    text = (f"Item: {task.category.replace('_', ' ')}. Anomaly type: "
            f"{task.anomaly_type.replace('_', ' ')}. Image size: {w}x{h} pixels. "
            f"Synthesize a realistic {task.anomaly_type.replace('_', ' ')} on image 1.")
    return {"role": "user", "content": [{"type": "image", "image": task.image},
                                        {"type": "text", "text": text}]}


def observation(name, result, images=()) -> dict:
    """A tool's reply: its JSON, with every image it made attached so the policy sees it."""
    content = [{"type": "text", "text": json.dumps(result)}]
    content += [{"type": "image", "image": im} for im in images]
    return {"role": "tool", "name": name, "content": content}


def message_text(message) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


@dataclass
class Turn:
    """One parsed assistant turn. action: call | answer | malformed | none."""
    action: str
    thinking: str | None = None
    call: dict | None = None
    answer: dict | None = None
    error: str | None = None

    @property
    def well_formed(self):
        return self.action in ("call", "answer") and self.error is None


TAG = re.compile(r"<(thinking|tool_call|answer)>(.*?)</\1>", re.S)
# far beyond any turn the stages let a model write (--max-new-tokens); the tag search takes time
# quadratic in a reply full of unclosed tags, about a second at this length
MAX_REPLY_CHARS = 32_000


def parse_turn(text) -> Turn:
    """Tolerant of whitespace around and between the tags; strict about the JSON inside them.
    Whatever the reply, the result is a Turn: what cannot be read is a malformed turn."""
    if len(text) > MAX_REPLY_CHARS:
        return Turn("malformed", error=f"the reply is {len(text)} characters long; at most "
                                       f"{MAX_REPLY_CHARS} are read")
    blocks = TAG.findall(text)
    thinking = [b.strip() for tag, b in blocks if tag == "thinking"]
    actions = [(tag, b.strip()) for tag, b in blocks if tag != "thinking"]
    style = None
    if len(thinking) != 1:
        style = "a turn needs exactly one <thinking> block"
    elif TAG.sub("", text).strip():
        style = "text outside the <thinking>, <tool_call> and <answer> tags"
    think = thinking[0] if thinking else None
    if not actions:
        return Turn("none", think, error=style or "no <tool_call> or <answer>")
    if len(actions) > 1:
        return Turn("malformed", think, error="one tool call or one answer per turn, not "
                                               f"{len(actions)}")
    tag, body = actions[0]
    try:
        payload = json.loads(body)
    except Exception as e:   # ValueError, and RecursionError from deeply nested brackets
        return Turn("malformed", think, error=f"the <{tag}> block is not valid JSON ({e})")
    if tag == "tool_call":
        if not (isinstance(payload, dict) and isinstance(payload.get("name"), str)
                and isinstance(payload.get("arguments"), dict)):
            return Turn("malformed", think, error='a tool call is {"name": str, "arguments": {...}}')
        return Turn("call", think, call=payload, error=style)
    if not (isinstance(payload, dict) and fits_type(payload.get("final_image_index"), "integer")):
        return Turn("malformed", think, error='an answer needs an integer "final_image_index"')
    return Turn("answer", think, answer=payload, error=style)


def format_call(thinking, name, arguments) -> str:
    return (f"<thinking>{thinking}</thinking>\n<tool_call>"
            f"{json.dumps({'name': name, 'arguments': arguments})}</tool_call>")


def format_answer(thinking, answer) -> str:
    return f"<thinking>{thinking}</thinking>\n<answer>{json.dumps(answer)}</answer>"


# ==============================================================================================
# 5. The episode runner
# ==============================================================================================

class Episode:
    """One task played out: the conversation, the tool session and what each turn did."""

    def __init__(self, task, toolbox):
        self.task, self.session = task, toolbox.session(task)
        self.messages = [{"role": "system", "content": system_prompt(toolbox.specs())},
                         user_message(task)]
        self.turns, self.answer, self.stop_reason = [], None, None

    def step(self, reply):
        self.messages.append({"role": "assistant", "content": reply})
        turn = parse_turn(reply)
        info = {"action": turn.action, "tool": None, "format_ok": turn.well_formed, "error": turn.error}
        self.turns.append(info)
        if turn.action == "none":
            self.stop_reason = "no_action"
        elif turn.action == "answer":
            self.answer, self.stop_reason = turn.answer, "answer"
            k = turn.answer["final_image_index"]
            if not self.session.is_generated(k):
                info.update(format_ok=False, error=f"answer names image {k}, not a generated image")
        elif turn.action == "malformed":
            self.messages.append(observation("error", {"error": turn.error}))
        else:
            name = info["tool"] = turn.call["name"]
            try:
                result, images = self.session.call(name, turn.call["arguments"])
            except ToolError as e:
                result, images = {"error": str(e)}, []
                if isinstance(e, CallError):
                    info.update(format_ok=False, error=str(e))
                if isinstance(e, BackendError):
                    info["backend_error"] = True   # rl.py leaves an episode whose judge failed out of its group
            except UserError:   # BackendDown: the run stops
                raise
            except Exception as e:   # a backend bug must not end a batch of episodes
                result, images = {"error": f"{name} failed: {type(e).__name__}: {e}"}, []
            info["result"] = result
            self.messages.append(observation(name, result, images))

    @property
    def done(self):
        return self.stop_reason is not None

    def record(self) -> dict:
        """The trajectory: everything later stages need (rewards, training, the gallery)."""
        s = self.session
        attempts = [{"image_index": k, "prompt": s.prompts[k], "score": s.scores.get(k)}
                    for k in sorted(s.prompts)]
        final = self.answer["final_image_index"] if self.answer else None
        if final is not None and not s.is_generated(final):
            final = None
        mask_index = None
        for t in self.turns:
            r = t.get("result") or {}
            if t["tool"] == "mask_gen" and r.get("anomaly_image") == final and "mask_index" in r:
                mask_index = r["mask_index"]
        return {
            "id": self.task.id, "dataset": self.task.dataset, "category": self.task.category,
            "anomaly_type": self.task.anomaly_type, "seed": self.task.seed,
            "normal_image": self.task.image_path,
            "messages": self.messages, "turns": self.turns,
            "tool_calls": [t["tool"] or t["action"] for t in self.turns],
            "attempts": attempts,
            "qe_scores": [attempt["score"] for attempt in attempts if attempt["score"] is not None],
            "answer": self.answer, "final_image_index": final,
            "final_score": s.scores.get(final), "mask_index": mask_index,
            "num_turns": len(self.turns), "stop_reason": self.stop_reason,
            "format_valid": bool(self.turns) and all(t["format_ok"] for t in self.turns),
            "images": s.images,
        }


def save_episode_images(messages, images, out, folder) -> list:
    """Write an episode's images as OUT/folder/<k>.png (k = the agent's numbering) and put their
    relative paths in the messages in place of the arrays; returns the paths by image number."""
    paths = {}
    for k, image in enumerate(images, 1):
        paths[id(image)] = f"{folder}/{k}.png"   # messages hold the very arrays the session made
        save_png(image, Path(out) / paths[id(image)])
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image":
                part["image"] = paths[id(part["image"])]
    return [paths[id(image)] for image in images]


def episode_stats(records) -> dict:
    """The rates every stage reports about a set of trajectories."""
    turns = [t for r in records for t in r["turns"]]
    multi = [r for r in records if len(r["attempts"]) >= 2]
    finals = [r["final_score"] for r in records if r["final_score"] is not None]
    completed = [r for r in records if r["stop_reason"] == "answer" and r["final_image_index"] is not None
                 and (r["mask_index"] is not None or "mask_gen" not in system_tools(r["messages"]))]
    n = max(len(records), 1)
    return {
        "samples": len(records),
        "well_formed_turns": sum(t["format_ok"] for t in turns) / max(len(turns), 1),
        "completed": len(completed) / n,
        "multi_attempt": len(multi) / n,
        "improved_when_refined": sum(r["final_score"] is not None and bool(r["qe_scores"]) and
                                     r["final_score"] > r["qe_scores"][0] for r in multi) / max(len(multi), 1),
        "mean_final_score": float(np.mean(finals)) if finals else None,
        "passed": sum(s >= PASS_SCORE for s in finals) / n,
        "mean_turns": float(np.mean([r["num_turns"] for r in records])) if records else 0.0,
    }


def format_stats(s) -> str:
    return (f"{s['samples']} episodes | completed (answer after mask) {s['completed']:.0%} | well-formed "
            f"turns {s['well_formed_turns']:.0%} | 2+ attempts {s['multi_attempt']:.0%} (final beats first "
            f"in {s['improved_when_refined']:.0%}) | mean final QE "
            f"{'n/a' if s['mean_final_score'] is None else format(s['mean_final_score'], '.2f')} | "
            f"passed {s['passed']:.0%}")


def system_tools(messages) -> list:
    """The tool names listed in a conversation's system prompt."""
    found = re.search(r"<tools>\n(.*)\n</tools>", message_text(messages[0]), re.S)
    return [json.loads(line)["function"]["name"] for line in found.group(1).split("\n")] if found else []


def run_episodes(policy, tasks, toolbox, max_turns=10, on_finish=None) -> list:
    """Play every task to its end. Each turn, all live episodes are answered by one batched policy
    call (the same loop serves synthesis, trajectory building and RL rollouts)."""
    episodes = [Episode(t, toolbox) for t in tasks]
    for _ in range(max_turns):
        live = [e for e in episodes if not e.done]
        if not live:
            break
        for episode, reply in zip(live, policy.act([e.messages for e in live])):
            episode.step(reply)
            if episode.done and on_finish:
                on_finish(episode)
    for e in episodes:
        if not e.done:
            e.stop_reason = "max_turns"
            if on_finish:
                on_finish(e)
    return [e.record() for e in episodes]


# ==============================================================================================
# 6. The policies: the vision-language model wrapper, the tiny policy, the expert
# ==============================================================================================
# A policy is anything with act(conversations) -> one reply text per conversation.
#
# The vision-language model behind one wrapper (SFT, RL and synthesis share it).
# Conversations are rendered in ChatML, as Qwen-VL's chat template does; tool observations become
# user turns wrapped in <tool_response>, the convention of Qwen's template. The rendering is one
# Jinja chat template, CHAT_TEMPLATE, set on every policy's tokenizer and saved with it, so that
# transformers, TRL and vLLM render a conversation exactly as training does. An image is one
# <|image_pad|> placeholder in the template; the wrapper (like Qwen's processor) repeats it once per
# image token. The assistant-token mask comes from the template's {% generation %} markers.

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = [{'type': 'text', 'text': message.content}] if message.content is string else message.content -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{%- for part in parts if part.type == 'text' -%}{{- part.text -}}{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + ('system' if message.role == 'system' else 'user') + '\\n' -}}"
    "{%- if message.role == 'tool' -%}{{- '<tool_response>\\n' -}}{%- endif -%}"
    "{%- for part in parts -%}"
    "{%- if part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message.role == 'tool' -%}{{- '\\n</tool_response>' -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


# model type -> (processor class, video processor class) of the Qwen-VL families the wrapper serves
PROCESSOR_CLASSES = {"qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
                     "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
                     "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor")}


def image_parts(messages) -> list:
    """What the image parts of a conversation hold, in order: arrays, or paths once saved."""
    return [part["image"] for m in messages if isinstance(m["content"], list)
            for part in m["content"] if part["type"] == "image"]


def rgb_image(image, root=None) -> np.ndarray:
    """An image part's picture with three channels; a path (as saved in trajectories) is read from root."""
    if isinstance(image, str):
        image = load_image(Path(root or ".") / image)
    return np.repeat(image[..., None], 3, 2) if image.ndim == 2 else image


def conversation_images(messages, root=None) -> list:
    """Every image of a conversation in order, with three channels."""
    return [rgb_image(image, root) for image in image_parts(messages)]


# ---- trajectories on disk --------------------------------------------------------------------
# Stored in one format, the one TRL's vision-language SFT reads as it is: every message's content
# is a list of parts, an image part is a bare {"type": "image"} placeholder, and the row's "images"
# lists the image files in placeholder order, relative to the JSONL file's folder. In memory
# (episodes, training) system and assistant contents are plain strings and each image part carries
# its image (an array, or a path once saved); the two functions below convert exactly.

def stored_conversation(messages) -> tuple:
    """(messages, images): the conversation in the stored format and what its image parts carried."""
    stored, images = [], []
    for m in messages:
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        content = []
        for part in parts:
            if part["type"] == "image":
                images.append(part["image"])
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": part["text"]})
        stored.append({**m, "content": content})
    return stored, images


def live_conversation(messages, images) -> list:
    """The in-memory form of stored messages: system and assistant contents as strings, each image
    placeholder with its entry of images, in order."""
    images = iter(images)
    live = []
    for m in messages:
        if m["role"] in ("system", "assistant"):
            live.append({**m, "content": message_text(m)})
        else:
            live.append({**m, "content": [{"type": "image", "image": next(images)} if p["type"] == "image"
                                          else p for p in m["content"]]})
    return live


class VLMPolicy:
    """A transformers vision-language model with its tokenizer and image processor.

    act(): the next assistant turn for many conversations at once (batched sampling).
    encode() / token_logprobs(): tokens, the assistant-token mask and per-token log-probabilities,
    for training."""

    def __init__(self, model, tokenizer, image_processor, temperature=1.0, max_new_tokens=384,
                 image_root=None):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.temperature, self.max_new_tokens, self.image_root = temperature, max_new_tokens, image_root
        self.merge = image_processor.merge_size ** 2
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        tokenizer.chat_template = CHAT_TEMPLATE   # the project's format, whatever a checkpoint brought
        self._kept = {}     # act(): id(conversation) -> (conversation, its Row) of the last call
        self._images = {}   # act(): picture key -> (pixel values, grid) of the last call
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
        AttentionInterface.register("cascade", cascade_attention)   # _decode's, by this name
        AttentionMaskInterface.register("cascade", sdpa_mask)        # its mask: sdpa's (True: attend)
        AttentionInterface.register("packed", packed_attention)     # _prefill's
        AttentionMaskInterface.register("packed", lambda **_: None)  # it masks each prompt itself

    # -- loading and saving ----------------------------------------------------------------------
    @classmethod
    def load(cls, path, device="cpu", flag="--policy ", **kwargs):
        """A model folder (runs/sft, a local checkpoint) or a Hugging Face id, e.g.
        Qwen/Qwen3-VL-4B-Thinking. bf16 on GPU. flag: how errors name the option, before the path."""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise UserError(f"{flag}{path} is not a model: expected a folder with config.json "
                            "(run sft.py first) or a Hugging Face id")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = AutoImageProcessor.from_pretrained(path)
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"{flag}{path}: cannot load a vision-language model ({str(e).splitlines()[0]})") from None
        return cls(model.to(device).eval(), tokenizer, image_processor, **kwargs)

    def save(self, path):
        """The model, the tokenizer with CHAT_TEMPLATE (chat_template.jinja), the image processor and
        the processor's configuration, so that transformers' Auto classes and vLLM load the folder."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            self.image_processor.save_pretrained(path)
        except OSError as e:
            raise UserError(f"cannot write the model to {path}: {e.strerror or e}") from None
        model_type = getattr(self.model.config, "model_type", None)
        if model_type in PROCESSOR_CLASSES:
            # written by hand: building the processor object needs its video processor, which needs
            # torchvision; AutoProcessor builds it from this file where torchvision is installed
            processor, video_processor = PROCESSOR_CLASSES[model_type]
            ip = self.image_processor
            config = {"processor_class": processor, "image_processor": ip.to_dict(), "video_processor": {
                "video_processor_type": video_processor, "patch_size": ip.patch_size,
                "temporal_patch_size": ip.temporal_patch_size, "merge_size": ip.merge_size,
                "image_mean": ip.image_mean, "image_std": ip.image_std}}
            write_atomic(path / "processor_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")

    # -- training setup --------------------------------------------------------------------------
    def make_trainable(self, lora="auto", lora_rank=16, train_vision=False) -> bool:
        """Freeze the vision encoder (its projector trains); wrap the language model in LoRA when
        lora is "on", or "auto" and the model has over 1B parameters. Returns whether LoRA is used."""
        n_params = sum(p.numel() for p in self.model.parameters())
        for name, param in self.model.named_parameters():
            param.requires_grad = train_vision or "visual" not in name or "merger" in name
        use_lora = lora == "on" or (lora == "auto" and n_params > 1e9)
        if use_lora:
            from peft import LoraConfig, get_peft_model
            self.model = get_peft_model(self.model, LoraConfig(
                r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
            for name, param in self.model.named_parameters():   # peft froze the projector: it keeps training
                if "visual" in name and "merger" in name and not train_vision:
                    param.requires_grad = True
        return use_lora

    # -- rendering -------------------------------------------------------------------------------
    def _render(self, messages, n_image_tokens, add_generation_prompt):
        """Token ids and a 0/1 mask of the tokens the policy wrote (assistant turns + their end):
        the chat template's tokens, each image's placeholder repeated n_image_tokens[k] times."""
        rendered = self.tokenizer.apply_chat_template(
            stored_conversation(messages)[0], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt)
        ids, mask, k = [], [], 0
        for token, trainable in zip(rendered["input_ids"], rendered["assistant_masks"]):
            repeat = 1
            if token == self.ids["<|image_pad|>"]:
                repeat, k = n_image_tokens[k], k + 1
            ids += [token] * repeat
            mask += [trainable] * repeat
        return ids, mask

    def encode(self, conversations, add_generation_prompt=False):
        """A batch padded on the right: input_ids, attention_mask, assistant_mask, mm_token_type_ids
        and the images' pixel_values and image_grid_thw."""
        rows, images = [], []
        for messages in conversations:
            imgs = conversation_images(messages, self.image_root)
            n_tokens = []
            if imgs:
                grid = self.image_processor(images=imgs, return_tensors="pt")["image_grid_thw"]
                n_tokens = [int(g.prod()) // self.merge for g in grid]
            rows.append(self._render(messages, n_tokens, add_generation_prompt))
            images += imgs
        width = max(len(ids) for ids, _ in rows)
        pad = self.ids["<|endoftext|>"]
        batch = {k: torch.zeros(len(rows), width, dtype=torch.long)
                 for k in ("input_ids", "attention_mask", "assistant_mask")}
        batch["input_ids"].fill_(pad)
        for i, (ids, mask) in enumerate(rows):
            batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
            batch["attention_mask"][i, :len(ids)] = 1
            batch["assistant_mask"][i, :len(ids)] = torch.tensor(mask)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.ids["<|image_pad|>"]).long()
        if images:
            batch.update(self.image_processor(images=images, return_tensors="pt"))
        return batch

    def _model_inputs(self, batch):
        device = self.model.device
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
        return {k: batch[k].to(device) for k in keys if k in batch}

    # -- training --------------------------------------------------------------------------------
    def token_logprobs(self, batch, temperature=1.0):
        """log p(token_t | tokens_<t) for t = 1..T-1 from temperature-scaled logits, and the mask of
        the tokens the policy wrote. Only the positions where some row predicts a written token go
        through the language-model head (logp is 0 at the others): the system prompt, observations
        and images, most of a conversation, need no logits."""
        inputs = self._model_inputs(batch)
        # encode pads on the right, after each row's last token, where causal attention never looks
        # back from: without the padding mask the batch takes the fast causal kernel, and the
        # tokens' logits stay what they are (the padding's own are never read)
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
        written = batch["assistant_mask"][:, 1:].to(inputs["input_ids"].device)
        keep = written.any(0).nonzero()[:, 0]   # position t predicts token t + 1; one index for the batch
        logits = self.model(**inputs, logits_to_keep=keep).logits.float() / temperature
        targets = inputs["input_ids"][:, keep + 1, None]
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
        logp = picked.new_zeros(written.shape).index_copy(1, keep, picked)
        return logp, written.float()

    # -- acting ----------------------------------------------------------------------------------
    # act() writes its own sampling loop instead of calling model.generate, to spare a multi-turn
    # rollout what it would repeat every turn:
    # - a conversation's keys and values are kept from one call to the next. The runner's
    #   conversations only grow (a reply, then an observation), so a turn prefills only what was
    #   appended; a new conversation starts from one of the same call that begins like it (the
    #   copies of a GRPO group's prompt), and each picture goes through the image processor once.
    #   Kept tokens count only as far as they equal the freshly rendered conversation's (the reply
    #   is re-tokenized, as training sees it) and, where images are, show the same pictures;
    # - the conversations' new tokens go through the model packed into one sequence, without
    #   padding, each attending only to its own past (packed_attention); then all decode together,
    #   one token a step, into a cache written in place (a growing one copies itself every step);
    #   a conversation leaves the batch as soon as it closes its turn;
    # - the tokens every conversation of the batch begins with (the system prompt, about half of
    #   a conversation) stay out of the decoding batch: cascade_attention reads their keys and
    #   values once a step for all rows, instead of once per row.
    # Greedy, it writes what model.generate writes from the freshly rendered conversation (tests
    # check both); sampling draws from softmax(logits / temperature), no top-k or top-p: the
    # distribution token_logprobs scores. The kept caches belong to the weights that made them:
    # change the weights only between runs of episodes, never while a conversation is being played.
    ROOM = 64   # free cache columns a decoding batch gets at a time

    def act(self, conversations) -> list:
        """The next assistant turn of each conversation (batched sampling)."""
        kept, self._kept = self._kept, {}
        images, self._images = self._images, {}
        prompts = []
        with torch.no_grad():
            for messages in conversations:
                own = kept.get(id(messages))
                prompts.append(self._plan(messages, [own[1]] if own else prompts, images))
            rows = self._prefill(prompts)
            self._decode(rows)
        for messages, row in zip(conversations, rows):
            # the entry holds the conversation, so that its id names no other list while kept
            self._kept[id(messages)] = (messages, row)
        end = self.ids["<|im_end|>"]
        return [self.tokenizer.decode(row.sampled[:-1] if row.sampled[-1] == end else row.sampled,
                                      skip_special_tokens=True) for row in rows]

    def _image_inputs(self, image, images_before) -> tuple:
        """An image part's picture as (key, pixel values, grid); the key is its path or a digest
        of its pixels, and a picture is processed once while conversations show it."""
        key = image if isinstance(image, str) else \
            f"{image.shape}{image.dtype}{hashlib.sha1(np.ascontiguousarray(image)).hexdigest()}"
        if key in images_before:
            self._images[key] = images_before[key]
        elif key not in self._images:
            processed = self.image_processor(images=[rgb_image(image, self.image_root)], return_tensors="pt")
            self._images[key] = (processed["pixel_values"], processed["image_grid_thw"][0])
        return (key, *self._images[key])

    def _plan(self, messages, candidates, images_before) -> "Prompt":
        """A conversation rendered for its next turn, and the longest beginning it shares with one of
        the candidates (its own row of the last call, or the prompts of this call before it)."""
        images = [self._image_inputs(part, images_before) for part in image_parts(messages)]
        ids, _ = self._render(messages, [int(grid.prod()) // self.merge for _, _, grid in images],
                              add_generation_prompt=True)
        pad = self.ids["<|image_pad|>"]
        starts = image_starts(ids, pad)
        reuse, source = 0, None
        for row in candidates:
            shared = shared_tokens(ids, [key for key, _, _ in images], starts, row)
            if shared > reuse:
                reuse, source = shared, row
        reuse = min(reuse, len(ids) - 1)   # the last prompt token is fed again: its logits start the reply
        tokens = torch.tensor([ids], device=self.model.device)
        # the model's own multimodal positions (t, h, w of every token, from the images' grids)
        positions, _ = self._rope_index()(
            tokens, mm_token_type_ids=(tokens == pad).long(),
            image_grid_thw=torch.stack([grid for _, _, grid in images]).to(tokens.device) if images else None)
        return Prompt(ids=ids, images=[key for key, _, _ in images], positions=positions,
                      pictures=[(pixels, grid) for (_, pixels, grid), start in zip(images, starts) if start >= reuse],
                      source=source, reuse=reuse,
                      wave=source.wave + 1 if isinstance(source, Prompt) else 0)

    def _prefill(self, prompts) -> list:
        """Each prompt's tokens after what its source holds, through the model: the rows, with their
        caches and their next token's logits. A prompt whose source is another prompt of this call
        waits for it (a later wave); each wave is one forward pass, its prompts' new tokens packed
        into one sequence without padding, each attending to its own past (packed_attention)."""
        device = self.model.device
        for wave in range(max(prompt.wave for prompt in prompts) + 1):
            batch = [prompt for prompt in prompts if prompt.wave == wave]
            sources = [prompt.source.row if isinstance(prompt.source, Prompt) else prompt.source for prompt in batch]
            packing = Packing(
                lengths=[len(prompt.ids) - prompt.reuse for prompt in batch],
                pasts=[[(keys[:, :, :prompt.reuse], values[:, :, :prompt.reuse]) for keys, values in source.cache]
                       if source else None for prompt, source in zip(batch, sources)])
            pictures = [picture for prompt in batch for picture in prompt.pictures]
            vision = {"pixel_values": torch.cat([pixels for pixels, _ in pictures]).to(device),
                      "image_grid_thw": torch.stack([grid for _, grid in pictures]).to(device)} if pictures else {}
            tokens = torch.tensor([[t for prompt in batch for t in prompt.ids[prompt.reuse:]]], device=device)
            positions = torch.cat([prompt.positions[:, :, prompt.reuse:] for prompt in batch], dim=2)
            last = torch.tensor(packing.lengths, device=device).cumsum(0) - 1   # each prompt's last token
            with self._attention("packed"):
                out = self.model(input_ids=tokens, position_ids=positions, use_cache=False, logits_to_keep=last,
                                 packing=packing, **vision)
            for i, prompt in enumerate(batch):
                cache = packing.caches[i]
                prompt.row = Row(ids=prompt.ids, images=prompt.images, cache=[cache[layer] for layer in sorted(cache)],
                                 position=int(prompt.positions.max()) + 1, logits=out.logits[:, i])
        return [prompt.row for prompt in prompts]

    def _rope_index(self):
        """The model's get_rope_index (the Qwen-VL families have one), also under LoRA adapters."""
        return next(m.get_rope_index for m in self.model.modules() if hasattr(m, "get_rope_index"))

    def _decode(self, rows):
        """Sample each row's reply: all rows one token a step, left-padded to one batch; a row is
        done when it closes its turn or has max_new_tokens, and then keeps its prompt and reply
        (all but the reply's last token, never fed) in ids and cache. The first `shared` tokens,
        the same in every row, are not in the batch: each step reads them once (cascade_attention)."""
        end, device = self.ids["<|im_end|>"], self.model.device
        shared = self._shared_prefix(rows)
        prefix = [(keys[:, :, :shared], values[:, :, :shared]) for keys, values in rows[0].cache]
        width = max(len(row.ids) for row in rows) - shared
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)   # 1: a token, 0: padding or room
        layers = []
        for layer in zip(*[row.cache for row in rows]):
            keys, values = (torch.zeros(len(rows), t.shape[1], width, t.shape[3], dtype=t.dtype, device=device)
                            for t in layer[0])
            for i, (k, v) in enumerate(layer):
                own = k.shape[2] - shared
                keys[i, :, width - own:], values[i, :, width - own:] = k[0, :, shared:], v[0, :, shared:]
            layers.append((keys, values))
        for i, row in enumerate(rows):
            mask[i, width - (len(row.ids) - shared):] = 1
        cache, mask = self._with_room(layers, mask)
        lines, filled = list(range(len(rows))), width   # lines: the row each line of the batch decodes
        positions = torch.tensor([row.position for row in rows], device=device)
        logits = torch.cat([row.logits for row in rows])
        with self._attention("cascade" if shared else None):
            while True:
                tokens = self._sample(logits)
                for b, (i, token) in enumerate(zip(lines, tokens.tolist())):
                    if i is None:   # a finished row's line, decoding what nobody reads until it is dropped
                        continue
                    row = rows[i]
                    row.sampled.append(token)
                    if token == end or len(row.sampled) == self.max_new_tokens:
                        row.ids = row.ids + row.sampled[:-1]
                        used = (mask[b, :filled] == 1).nonzero()[:, 0]   # its tokens, without its left padding
                        row.cache = [(torch.cat([keys, layer.keys[b:b + 1, :, used]], dim=2),
                                      torch.cat([values, layer.values[b:b + 1, :, used]], dim=2))
                                     for (keys, values), layer in zip(prefix, cache.layers)]
                        lines[b] = None
                stay = [b for b, i in enumerate(lines) if i is not None]
                if not stay:
                    return
                # dropping lines copies the whole cache: it waits until a quarter of them are finished
                if 4 * (len(lines) - len(stay)) >= len(lines) or filled == mask.shape[1]:
                    # the lines that go on, without the columns none of them uses, and fresh room
                    first = int(mask[stay, :filled].any(0).nonzero()[0])
                    cache, mask = self._with_room([(layer.keys[stay, :, first:filled], layer.values[stay, :, first:filled])
                                                   for layer in cache.layers], mask[stay, first:filled])
                    lines, positions, tokens, filled = [lines[b] for b in stay], positions[stay], tokens[stay], filled - first
                mask[:, filled] = 1
                out = self.model(input_ids=tokens[:, None], attention_mask=mask, cache=cache, use_cache=True,
                                 position_ids=positions.view(1, -1, 1).expand(3, -1, -1), logits_to_keep=1,
                                 **({"shared_prefix": prefix} if shared else {}))
                positions, logits, filled = positions + 1, out.logits[:, -1], filled + 1

    def _shared_prefix(self, rows) -> int:
        """How many first tokens every row's cache holds alike (the same ids, the same pictures);
        0 for a single row, which has nobody to share with."""
        if len(rows) < 2:
            return 0
        first = rows[0]
        starts = image_starts(first.ids, self.ids["<|image_pad|>"])
        return min(shared_tokens(first.ids, first.images, starts, row) for row in rows[1:])

    @contextmanager
    def _attention(self, implementation):
        """The language model's attention function switched to `implementation` (None: unchanged)
        for the block; the vision tower's is untouched."""
        config = self.model.config.get_text_config()
        before = config._attn_implementation
        config._attn_implementation = implementation or before
        try:
            yield
        finally:
            config._attn_implementation = before

    def _with_room(self, layers, mask) -> tuple:
        """A cache written in place, holding `layers` ((keys, values) per layer) and ROOM free
        columns after them, and the mask widened to match."""
        from transformers import StaticCache
        cache = StaticCache(config=self.model.config, max_cache_len=mask.shape[1] + self.ROOM)
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        return cache, torch.cat([mask, mask.new_zeros(len(mask), self.ROOM)], dim=1)

    def _sample(self, logits):
        """Greedy at temperature 0, else a draw from softmax(logits / temperature)."""
        logits = logits.float()
        if self.temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial(torch.softmax(logits / self.temperature, dim=-1), 1).squeeze(1)


def packed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, packing=None, **kwargs):
    """Attention of several prompts packed into one sequence (a transformers attention function,
    registered as "packed"): each prompt's new tokens attend causally to themselves and to its own
    past keys and values (packing.pasts), never to another prompt's; the prompt's whole keys and
    values (past and new) go to packing.caches."""
    outputs, start = [], 0
    for i, length in enumerate(packing.lengths):
        keys, values = key[:, :, start:start + length], value[:, :, start:start + length]
        past = packing.pasts[i]
        if past is not None:
            past_keys, past_values = past[module.layer_idx]
            keys, values = torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2)
        packing.caches[i][module.layer_idx] = (keys, values)
        n_past = keys.shape[2] - length
        # new token j sees the past and new tokens 0..j
        causal = torch.arange(keys.shape[2], device=keys.device) <= n_past + torch.arange(length, device=keys.device)[:, None]
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:start + length], keys, values, attn_mask=causal, scale=scaling, enable_gqa=True))
        start += length
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def cascade_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, shared_prefix=None, **kwargs):
    """Attention of a one-token decoding step whose rows all begin with the same tokens (a
    transformers attention function, registered as "cascade"). shared_prefix holds, per layer, those
    tokens' keys and values once (batch of one), and the cache (key, value) only each row's own
    tokens after them: the prefix is read once for all rows, as one matrix product, and one softmax
    spans both parts, so each row's output is what full attention over its whole conversation gives."""
    prefix_keys, prefix_values = shared_prefix[module.layer_idx]
    batch, heads, length, dim = query.shape
    kv_heads, n_prefix = key.shape[1], prefix_keys.shape[2]
    query = query.reshape(batch, kv_heads, heads // kv_heads * length, dim)   # each key head's query heads
    every_row = query.transpose(0, 1).reshape(kv_heads, -1, dim)               # all rows' queries, per key head
    prefix_scores = torch.bmm(every_row, prefix_keys[0].transpose(1, 2)).view(kv_heads, batch, -1, n_prefix)
    own_scores = query @ key.transpose(2, 3)
    if attention_mask is not None:
        own_scores = own_scores.masked_fill(~attention_mask, float("-inf"))
    scores = torch.cat([prefix_scores.transpose(0, 1), own_scores], dim=-1) * scaling
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)   # fp32 softmax under bf16
    from_prefix = torch.bmm(weights[..., :n_prefix].transpose(0, 1).reshape(kv_heads, -1, n_prefix), prefix_values[0])
    out = from_prefix.view(kv_heads, batch, -1, dim).transpose(0, 1) + weights[..., n_prefix:] @ value
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def image_starts(ids, pad) -> list:
    """The position of each image's first placeholder token in ids."""
    return [t for t in range(1, len(ids)) if ids[t] == pad and ids[t - 1] != pad]


def shared_tokens(ids, image_keys, starts, row) -> int:
    """How many first tokens of a rendered prompt (ids; its images' keys and first tokens) a row's
    cache holds: up to the first token that differs, or an image that shows another picture."""
    n = min(len(ids), len(row.ids))
    differ = np.flatnonzero(np.asarray(ids[:n]) != np.asarray(row.ids[:n]))
    shared = int(differ[0]) if len(differ) else n
    for k, start in enumerate(starts):
        if start < shared and (k >= len(row.images) or row.images[k] != image_keys[k]):
            return start
    return shared


@dataclass
class Prompt:
    """One conversation inside VLMPolicy.act before its prefill: its rendered ids, its images' keys,
    its tokens' positions, the pictures of the images it has yet to feed, the row (of the last call)
    or prompt (of this call) whose first `reuse` tokens' keys and values it starts from, the wave of
    the prefill it belongs to (one after its source prompt's), and the row it becomes."""
    ids: list
    images: list
    positions: "torch.Tensor"
    pictures: list
    source: object
    reuse: int
    wave: int
    row: "Row" = None


class Packing:
    """What packed_attention reads and writes during one packed forward pass: each prompt's number
    of new tokens and past (keys, values) per layer (None: no past), and its keys and values after."""

    def __init__(self, lengths, pasts):
        self.lengths, self.pasts = lengths, pasts
        self.caches = [{} for _ in lengths]   # per prompt: layer index -> (keys, values)


@dataclass
class Row:
    """One conversation inside VLMPolicy.act: the tokens fed so far and their keys and values (a
    (keys, values) pair per layer, batch of one), its images' keys, the position and logits of its
    next token, and the tokens sampled in this call."""
    ids: list
    images: list
    cache: list
    position: int
    logits: "torch.Tensor"
    sampled: list = field(default_factory=list)


def train_tokenizer(texts, vocab_size=4000, max_token_length=16, words=()):
    """A byte-level BPE tokenizer trained offline on the trajectory corpus, with ChatML's special
    tokens: what a tiny model needs to read and write tool calls compactly. `words` (the task's
    item names and anomaly types) are kept whole wherever they stand."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    # merges that cross spaces would glue a task word to whatever stands next to it, so "cut" would
    # be one token in the task ("cut"), another in the thinking ("cut, so I "), a third in a tool
    # call ('cut"'): the policy could not copy the type it is asked for, only guess it from the
    # item (measured: a tiny SFT policy gave each of a category's types about the same probability
    # in its prompt_gen call). Split out whole, each word is one and the same token everywhere.
    whole_words = []
    if words:
        alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
        whole_words = [pre_tokenizers.Split(Regex(rf"\b(?:{alternatives})\b"), behavior="isolated")]
    # merges may cross spaces (repeated phrases become few tokens, so sequences stay short), but
    # not quotes: a JSON value such as an item name stays its own piece, easy to copy; nor newlines:
    # every seam of the chat template (after "assistant\n", around a tool's JSON) is a newline or a
    # special token, so the rendered conversation tokenizes as one string exactly as piece by piece,
    # and a reply starts on a token boundary, where generation starts
    bpe.pre_tokenizer = pre_tokenizers.Sequence(whole_words + [
        pre_tokenizers.Split('"', behavior="merged_with_previous"),
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, max_token_length=max_token_length,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_policy(texts, image_side=128, seed=0, words=(), **kwargs) -> VLMPolicy:
    """A small Qwen3-VL built from config (random init): 4 layers of width 256, a 2-layer vision
    tower, an image of image_side pixels seen as (image_side / 32)^2 tokens; its tokenizer is
    trained on texts and keeps `words` whole (train_tokenizer)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, words=words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=8192, bos_token_id=None,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [8, 12, 12], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2,
                           out_hidden_size=256, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=256,
                           deepstack_visual_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    model = Qwen3VLForConditionalGeneration(config)
    pixels = image_side * image_side
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                               min_pixels=pixels, max_pixels=pixels,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return VLMPolicy(model, tokenizer, image_processor, **kwargs)


def chat_messages(messages, root=None) -> list:
    """A conversation as OpenAI chat messages: text contents as strings, images as base64 PNG data
    URLs in image_url parts, in place; tool observations keep the role "tool" and their name (the
    chat template renders them as Qwen's <tool_response> turns)."""
    chat = []
    for m in messages:
        if not isinstance(m["content"], list):
            chat.append({**m})
            continue
        content = []
        for part in m["content"]:
            if part["type"] == "image":
                image = part["image"]
                if isinstance(image, str):
                    image = load_image(Path(root or ".") / image)
                content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
            else:
                content.append({"type": "text", "text": part["text"]})
        chat.append({**m, "content": content})
    return chat


class ServedPolicy:
    """The policy as a model behind an OpenAI-compatible server, e.g. `vllm serve runs/rl`
    (--policy openai:http://localhost:8000/v1#runs/rl). The conversations of a turn are sent
    concurrently, so the server batches them. A request that fails (after the client's retries)
    is an empty reply: the runner records a turn without an action and the episode ends there."""

    def __init__(self, spec, temperature=0.0, max_new_tokens=384, workers=8, image_root=None,
                 api_key_env="OPENAI_API_KEY"):
        self.server = ModelServer(spec, api_key_env=api_key_env)
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.workers, self.image_root = workers, image_root

    def act(self, conversations) -> list:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._reply, conversations))

    def _reply(self, messages) -> str:
        try:
            return self.server.chat(chat_messages(messages, self.image_root), temperature=self.temperature,
                                    max_tokens=self.max_new_tokens)
        except ToolError:
            return ""


def load_policy(spec, seed=0, device=None, **kwargs):
    """--policy expert | openai:<base-url>#<model> (a served policy) | a model folder (runs/sft) |
    a Hugging Face id."""
    if spec == "expert":
        return ExpertPolicy(seed=seed)
    if spec.startswith("openai:"):
        return ServedPolicy(spec, **kwargs)
    torch.manual_seed(seed)
    return VLMPolicy.load(spec, device=device or default_device(), **kwargs)


# ---- the expert (scripted) policy -------------------------------------------------------------

class ExpertPolicy:
    """Follows the canonical order (docs/METHOD.md 2): PG -> IG -> QE [-> KR -> refine -> IG -> QE]...
    -> MG -> answer, and explains every step in its thinking. It decides from the conversation
    alone, like a language model would: the tools from the system prompt, the task from the user
    message, everything else from the observations."""

    temperature = 0.0   # scripted: the same reply at any temperature (rl.evaluate sets one)

    def __init__(self, seed=0, max_attempts=3):
        self.seed, self.max_attempts = seed, max_attempts

    def act(self, conversations) -> list:
        return [self.next_turn(messages) for messages in conversations]

    def next_turn(self, messages) -> str:
        available = system_tools(messages)
        m = re.search(r"Item: (.*?)\. Anomaly type: (.*?)\. Image size: (\d+)x", message_text(messages[1]))
        item, defect, side = m.group(1), m.group(2), int(m.group(3))
        history = []   # (tool name, arguments, result) of every call so far
        for msg, reply in zip(messages[2::2], messages[3::2]):
            turn = parse_turn(msg["content"])
            if turn.call:
                history.append((turn.call["name"], turn.call["arguments"], json.loads(message_text(reply))))
        rng = np.random.default_rng([self.seed, stable_seed(*(message_text(m) for m in messages))])
        attempts = [r["image_index"] for name, _, r in history if name == "image_gen" and "image_index" in r]
        scores = {r["image_index"]: r for name, _, r in history if name == "quality_eval" and "score" in r}
        knowledge = next((r for name, _, r in history if name == "knowledge_retrieval" and "attributes" in r), None)
        last = history[-1] if history else None

        if last is None:
            if "prompt_gen" in available:
                return format_call(
                    f"Image 1 is a normal {item}. To put a realistic {defect} on it I first need a "
                    "precise local-edit prompt that names the part, shape, colour and size, so I "
                    "call prompt_gen.", "prompt_gen", {"image": 1, "item_name": item, "anomaly_type": defect})
            return self._generate(item, defect, side, None, {}, rng, "There is no prompt tool, so I "
                                  "write the edit prompt myself from what I know of this defect.")
        name, args, result = last
        if "error" in result and name == "knowledge_retrieval":
            return self._refine(item, defect, side, None, history, rng)
        if "error" in result:
            if sum("error" in r for _, _, r in history) > 2 or not attempts:
                return self._generate(item, defect, side, knowledge, {}, rng,
                                      f"The last call failed ({result['error']}). I write a "
                                      "complete prompt myself and generate again.")
            return self._finish(available, attempts, scores, note=f"The last call failed "
                                f"({result['error']}), so I stop refining and keep what I have.")
        if name == "prompt_gen":
            return format_call(
                f"prompt_gen wrote: \"{result['prompt']}\" It names the part and the look of the "
                f"{defect}. I edit the original image (image 1) with it.",
                "image_gen", {"prompt": result["prompt"], "target_image": 1})
        if name == "image_gen":
            k = result["image_index"]
            if "quality_eval" in available:
                return format_call(
                    f"Image {k} is attempt {len(attempts)}. Before I accept it I need an independent "
                    "judgement of where the defect sits and how real it looks, so I call quality_eval.",
                    "quality_eval", {"anomaly_image": k, "item_name": item, "anomaly_type": defect})
            return self._finish(available, attempts, scores, note="There is no quality tool, so I "
                                f"keep image {k}.")
        if name == "quality_eval":
            s, k = result["score"], result["image_index"]
            if s >= PASS_SCORE or len(attempts) >= self.max_attempts:
                parts = (f" (location {result['location_score']:g}, quality {result['quality_score']:g})"
                         if "location_score" in result and "quality_score" in result else "")
                why = (f"Image {k} scored {s:g}/10{parts}, which passes the threshold of {PASS_SCORE:g}."
                       if s >= PASS_SCORE else
                       f"Image {k} scored {s:g}/10, below {PASS_SCORE:g}, and I have used all "
                       f"{self.max_attempts} attempts.")
                return self._finish(available, attempts, scores, note=why)
            if "knowledge_retrieval" in available and knowledge is None:
                return format_call(
                    f"Image {k} scored only {s:g}/10, below {PASS_SCORE:g}. The review says: "
                    f"\"{result['review']}\" Before I rewrite the prompt I look up what a {defect} on "
                    f"a {item} really looks like, where it occurs and how large it is.",
                    "knowledge_retrieval", {"item_name": item, "anomaly_type": defect})
            return self._refine(item, defect, side, knowledge, history, rng)
        if name == "knowledge_retrieval":
            return self._refine(item, defect, side, knowledge, history, rng)
        if name == "mask_gen":
            k = result["anomaly_image"]
            s = scores.get(k, {}).get("score")
            return format_answer(
                f"mask_gen returned mask image {result['mask_index']}, covering "
                f"{100 * result['area_fraction']:.1f}% of the image. Image {k} and its mask are the "
                "result.", {"status": "success" if s is None or s >= PASS_SCORE else "partial",
                            "final_image_index": k, "mask_generated": not result["empty"],
                            "synthesis_logic": f"a {defect} on the {item}"
                                               + (f", judged {s:g}/10" if s is not None else "")
                                               + f" after {len(attempts)} attempt(s)"})
        return self._finish(available, attempts, scores, note=f"Unexpected reply from {name}.")

    def _finish(self, available, attempts, scores, note):
        # keep the best-judged attempt (the later one on a tie)
        best = max(attempts, key=lambda k: (scores.get(k, {}).get("score", -1), k))
        if len(attempts) > 1:
            note += f" Of my {len(attempts)} attempts, image {best} is the best."
        if "mask_gen" in available:
            return format_call(note + f" I now extract the mask of image {best} with mask_gen.",
                               "mask_gen", {"anomaly_image": best})
        return format_answer(note + " There is no mask tool, so I answer without one.",
                             {"status": "success", "final_image_index": best,
                              "mask_generated": False, "synthesis_logic": "best judged attempt"})

    def _refine(self, item, defect, side, knowledge, history, rng):
        """Rewrite the prompt from the last judgement (its advice, when the judge gives data) and,
        when retrieved, the knowledge."""
        judgement = next(r for name, _, r in reversed(history) if name == "quality_eval")
        review = judgement["review"]
        # quoted in the thinking only: the sentences that ask for a change (after a semicolon)
        asks = [s for s in re.split(r"(?<=\.)\s+", review) if ";" in s]
        reason = ("The review asks: " + " ".join(f'"{s}"' for s in asks)) if asks else \
                 f"The review says: \"{review}\""
        return self._generate(item, defect, side, knowledge, judgement.get("advice", {}), rng, reason)

    def _generate(self, item, defect, side, knowledge, advice, rng, reason):
        attrs = dict(knowledge["attributes"]) if knowledge else guess_attributes(defect)
        notes = []
        if knowledge:
            notes.append(f"The knowledge base says a {defect} on a {item} is a {attrs['shape']} "
                         f"{'of ' + attrs['colour'] + ' colour' if attrs['colour'] else attrs['tone']}, "
                         f"{attrs['extent'][0]:.0%}-{attrs['extent'][1]:.0%} of the image, at "
                         f"{attrs['part']}, with {attrs['edge']} edges.")
        size = round(float(np.mean(attrs["extent"])) * side * rng.uniform(0.85, 1.15))
        # the judge's advice outranks general knowledge; a judge that writes only prose gives none,
        # and the rewrite then rests on the knowledge (or the type's family) and high contrast alone
        size = advice.get("size_px", size)
        attrs["where"] = advice.get("place", attrs["where"])
        attrs["edge"] = advice.get("edge", attrs["edge"])
        attrs["part"] = advice.get("part", attrs["part"])
        if advice.get("tone") in ("darker", "brighter", "colour"):
            attrs["tone"] = advice["tone"]
        attrs["colour"] = advice.get("colour", attrs["colour"])
        tone = {"darker": "dark", "brighter": "bright"}.get(attrs["tone"])
        colour = attrs["colour"] if attrs["colour"] and attrs["colour"] not in ("black", "white") else None
        looks = " ".join(w for w in [tone, colour, SHAPE_PHRASES[attrs["shape"]]] if w)
        place = {"edge": f"at the edge of {attrs['part']}", "interior": "away from the outline"}.get(attrs["where"])
        edges = "soft, blended edges" if attrs["edge"] == "soft" else "crisp edges"
        prompt = local_edit_prompt(defect, attrs["part"], attrs["shape"], tone=tone, colour=colour, size_px=size,
                                   length="long" if attrs["shape"] in ("line", "crack", "slit") else "across",
                                   visibility="clearly visible with high contrast", edges=edges, place=place)
        thinking = " ".join([reason] + notes + [f"So I ask for a clearly visible {looks} of about "
                                                f"{size} px with {edges}{', ' + place if place else ''}, "
                                                "and edit image 1 again."])
        return format_call(thinking, "image_gen", {"prompt": prompt, "target_image": 1})
