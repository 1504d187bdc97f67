"""
evaluate.py -- how good is a set of synthesized anomalies? The paper's evaluation protocol
(docs/METHOD.md section 7), run on several generated sets side by side.

    python synthesize.py && python evaluate.py                            # runs/synth, toy world, small preset
    python synthesize.py --method draem --out runs/synth-draem
    python evaluate.py --gen runs/synth runs/synth-draem                  # two sets side by side
    python evaluate.py --gen runs/mvtec      # made with synthesize.py --data mvtec --data-root R --out runs/mvtec
    python benchmarks/compare.py                                          # the whole toy comparison

Each --gen DIR (default runs/synth) is a folder in synthesize.py's layout, made by any method:
DIR/<category>/<type>/image/<name>.png with its mask DIR/<category>/<type>/mask/<name>.png.
The dataset, its folder and its image side come from DIR/config.json (synthesize.py writes it), so
they need no flags; --data, --data-root and --size given on the command line win, with a notice
where they disagree with it. Sets made from different datasets or image sides are refused: their
real test sets differ. The categories evaluated are those the sets hold (or --categories).
Per evaluation category the real anomalies of each type are sorted by file name: the first third
are the few-shot references, the other two thirds the test set. For every set and category:
  classification  a ResNet34 with one output per anomaly type, trained only on the generated
                  images, tested on the real two thirds: accuracy
  localization    DRAEM's discriminative UNet, trained with focal loss on a 50/50 mix of real normal
                  training images (empty masks) and generated anomalies with their masks, tested on
                  all real test/good images plus the real two thirds. Pixel score: the anomaly
                  channel; image score: the max of the 21x21 mean-filtered map. AUROC, AP, F1-max
  IS, IC-LPIPS    need torch-fidelity's Inception and LPIPS-VGG with their weights; where they are
                  not installed the columns say n/a and the table says why
It writes OUT/results.json and OUT/results.md (one table, methods as rows, as in the paper) and
prints the table.

Simplifies: on the toy world the default preset trains smaller and shorter than the paper (see
--preset); without reachable ImageNet weights the ResNet34 starts from scratch. By default every
model trains a fixed schedule and the last epoch is reported; --select-on-test reproduces the
peers' rule (the best test epoch), which is test-set selection.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import tools

# DECISION (docs/METHOD.md 7 gives none for the toy world): sizes with which the 4-method comparison
# (benchmarks/compare.py) took 14.5 min on 2 shared CPU cores; the paper preset is the paper's.
PRESETS = {
    "paper": dict(epochs=30, loc_epochs=30, image_size=256, batch_size=8, lr=1e-4, unet_width=64,
                  pretrained="microsoft/resnet-34"),
    "toy": dict(epochs=12, loc_epochs=12, image_size=128, batch_size=8, lr=1e-3, unet_width=8,
                pretrained="none"),
}
METRICS = ("is", "ic_lpips", "accuracy", "image_auroc", "image_ap", "image_f1", "pixel_auroc",
           "pixel_ap", "pixel_f1")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DEFAULT_GEN = "runs/synth"   # where python synthesize.py writes by default


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--gen", nargs="+", default=None, metavar="DIR", help=f"generated sets to compare (synthesize.py's layout; default: {DEFAULT_GEN})")
    # None = not given: then the sets' config.json decides (see dataset_flags)
    data.add_argument("--data", default=None, help="the real dataset: toy, mvtec or visa (default: the sets' config.json, else toy)")
    data.add_argument("--data-root", default=None, help="its folder (default: the sets' config.json; toy: where it is cached)")
    data.add_argument("--size", type=int, default=None, help="the dataset's image side, as given to synthesize.py (default: the sets' config.json; toy 128, real 256)")
    data.add_argument("--categories", default=None, help="comma list; default: the categories the sets hold")
    train = p.add_argument_group("training (unset flags come from the preset)")
    train.add_argument("--preset", default="auto", help="toy (default on --data toy: 12 epochs, 128 px, lr 1e-3, UNet width 8, "
                       "from scratch; smaller than the paper's) or paper (default on real data: 30 epochs, 256 px, "
                       "batch 8, Adam 1e-4, UNet width 64, ImageNet ResNet34)")
    train.add_argument("--epochs", type=int, default=None, help="ResNet34 epochs over the generated images (paper: 30)")
    train.add_argument("--loc-epochs", type=int, default=None, help="UNet epochs, each all generated anomalies plus as many normals (the paper gives none; paper preset: 30)")
    train.add_argument("--image-size", type=int, default=None, help="side the models see, a multiple of 32 (paper: 256)")
    train.add_argument("--batch-size", type=int, default=None, help="images per step (paper: 8)")
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate of both models (paper: 1e-4)")
    train.add_argument("--unet-width", type=int, default=None, help="channels of the UNet's first block (DRAEM: 64)")
    train.add_argument("--pretrained", default=None, help="ResNet34 weights: a Hugging Face id or folder, or none (from scratch)")
    train.add_argument("--select-on-test", action="store_true", help="report each model at its best test epoch (ResNet34 by "
                       "accuracy, UNet by pixel AP), the peers' rule, instead of the last epoch")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/eval", help="folder for results.json and results.md")
    run.add_argument("--seed", type=int, default=0, help="seed of initialization and batch order (the same for every set)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    run.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's, all cores); "
                     "1 when another job shares the cores, where oversubscribed threads run up to 10x slower")
    return p.parse_args(argv)


# ==============================================================================================
# The metrics, as small functions (tests check them against hand-computed values)
# ==============================================================================================

def _ranked(labels, scores):
    """True and false positives at each distinct threshold, from the highest score down; tied
    scores form one threshold, so the order among ties cannot change a metric."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape or labels.size == 0:
        raise ValueError(f"labels and scores must be non-empty and of one length ({labels.size} vs {scores.size})")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(labels[order])
    fp = np.cumsum(~labels[order])
    last = np.r_[np.flatnonzero(np.diff(scores[order])), labels.size - 1]   # the end of each tie group
    return tp[last], fp[last], int(labels.sum()), int((~labels).sum())


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve; ties count half (the Mann-Whitney U statistic). Undefined, so a
    ValueError, when only one class is present."""
    tp, fp, pos, neg = _ranked(labels, scores)
    if pos == 0 or neg == 0:
        raise ValueError("AUROC is undefined with only one class in the labels")
    tpr, fpr = np.r_[0, tp / pos], np.r_[0, fp / neg]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(labels, scores) -> float:
    """Sum over thresholds of (recall gained) x precision, the step-wise area under the
    precision-recall curve. 1.0 when every label is positive; a ValueError when none is."""
    tp, fp, pos, _ = _ranked(labels, scores)
    if pos == 0:
        raise ValueError("average precision is undefined without a positive label")
    recall_gained = np.diff(np.r_[0, tp]) / pos
    return float(np.sum(recall_gained * tp / (tp + fp)))


def f1_max(labels, scores) -> float:
    """The best F1 over all thresholds; a ValueError without a positive label."""
    tp, fp, pos, _ = _ranked(labels, scores)
    if pos == 0:
        raise ValueError("F1 is undefined without a positive label")
    return float(np.max(2 * tp / (2 * tp + fp + (pos - tp))))


def inception_score(probs, splits=10):
    """exp(mean KL(p(y|x) || p(y))) per split of the images, p(y) the split's mean prediction;
    returns (mean, std) over splits. The images are cut into `splits` parts of near-equal size
    (fewer parts when there are fewer images)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError("probs must be a non-empty N x classes array")
    scores = []
    for part in np.array_split(probs, min(splits, len(probs))):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: a class an image gives no probability adds nothing
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1)) - np.log(np.where(marginal > 0, marginal, 1))), 0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def ic_lpips(gen, refs, dist, max_members=50) -> float:
    """Intra-cluster LPIPS: every generated image joins the cluster of its nearest reference (the
    first one on a tie); in each cluster the first max_members members are compared pairwise and
    the distances averaged; the result averages the clusters. DECISION: a cluster with fewer than
    two members has no pair and is left out (counting it as 0 would punish a set for landing near
    few references); NaN when no cluster has a pair."""
    if not refs:
        raise ValueError("IC-LPIPS needs at least one reference image")
    clusters = [[] for _ in refs]
    for g in gen:
        clusters[int(np.argmin([dist(g, r) for r in refs]))].append(g)
    means = []
    for members in clusters:
        members = members[:max_members]
        pairs = [dist(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
        if pairs:
            means.append(float(np.mean(pairs)))
    return float(np.mean(means)) if means else float("nan")


# ==============================================================================================
# Reading the sets: the real data of a category, and each generated folder
# ==============================================================================================

def resize(image, side, nearest=False) -> np.ndarray:
    if image.shape[:2] == (side, side):
        return image
    pil = Image.fromarray(image.astype(np.uint8) * 255 if image.dtype == bool else image)
    out = np.asarray(pil.resize((side, side), Image.NEAREST if nearest else Image.BICUBIC))
    return out > 127 if image.dtype == bool else out


def real_sets(dataset, category, side) -> dict:
    """The real test data of a category: per type the two thirds after the few-shot references
    (dataset.split), the normal train and test images."""
    types = dataset.types(category)
    test, refs = [], {}
    for t in types:
        refs[t], held_out = dataset.split(category, t)
        test += [(a, t) for a in held_out]
    if not test:
        raise tools.UserError(f"{category} has no real test anomalies under {dataset.root}")
    if not dataset.train_good[category] or not dataset.test_good[category]:
        raise tools.UserError(f"{category} needs normal train and test images under {dataset.root}")
    load = lambda p: resize(dataset.load(p), side)
    return {
        "types": types,
        "refs": {t: [load(a.image) for a in refs[t]] for t in types},
        "test_images": np.stack([load(a.image) for a, _ in test]),
        "test_labels": np.array([types.index(t) for _, t in test]),
        "test_masks": np.stack([resize(dataset.load_mask(a.mask), side, nearest=True) for a, _ in test]),
        "good_train": np.stack([load(p) for p in dataset.train_good[category]]),
        "good_test": np.stack([load(p) for p in dataset.test_good[category]]),
    }


def run_config(folder) -> dict:
    """A generated set's config.json, as synthesize.py writes it (data, data_root, size, method,
    policy, ...); {} for a set made without it."""
    folder = Path(folder)
    if not folder.is_dir():
        make = "python synthesize.py" + ("" if str(folder) == DEFAULT_GEN else f" --out {folder}")
        raise tools.UserError(f"--gen {folder} does not exist or is not a folder: run {make} first")
    if not (folder / "config.json").is_file():
        return {}
    try:
        return json.loads((folder / "config.json").read_text())
    except ValueError:
        raise tools.UserError(f"{folder / 'config.json'} is corrupt") from None


def dataset_flags(args, folders, configs) -> list:
    """--data, --data-root and --size left unset come from the sets' config.json (else the
    defaults); returns a notice for each given flag that disagrees with a set's config. Sets of
    different datasets or image sides are refused; a given --data-root settles sets that only
    differ in where their dataset lay."""
    made = {folder: config for folder, config in zip(folders, configs) if config}
    notices = []
    for key in ("data", "size", "data_root"):
        flag, given = f"--{key.replace('_', '-')}", getattr(args, key)
        recorded = {folder: c[key] for folder, c in made.items() if c.get(key) is not None}
        if len(set(recorded.values())) > 1 and (given is None or key != "data_root"):
            raise tools.UserError("the sets were made from different datasets or image sides (" + "; ".join(
                f"{f}: {c.get('data')}, {c.get('size')} px, {c.get('data_root')}" for f, c in made.items())
                + "): evaluate them in separate runs")
        if given is None:
            value = next(iter(recorded.values()), None)
            if key == "data_root" and value and args.data != "toy" and not Path(value).is_dir():
                raise tools.UserError(f"{next(iter(recorded))}/config.json names the dataset folder {value}, "
                                      "which is not here; pass --data-root")
            setattr(args, key, value)
            continue
        for folder, value in recorded.items():
            if (Path(given).resolve() == Path(value)) if key == "data_root" else given == value:
                continue
            if key == "data":   # its categories and types are another dataset's: nothing to evaluate
                raise tools.UserError(f"--gen {folder} was synthesized on --data {value}, not on {given} "
                                      "(its config.json)")
            notices.append(f"note: {flag} {given} given; {folder} was synthesized with {flag} {value} (its config.json)")
    args.data = args.data or "toy"
    return notices


def category_dirs(folder) -> list:
    """The category folders of synthesize.py's layout in a set: those holding <type>/image/."""
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and any((t / "image").is_dir() for t in p.iterdir()))


def read_generated(folder, dataset, categories) -> dict:
    """List a generated set: {category: [(image path, mask path, type)]}, its name and notes.
    Anything that does not fit the dataset is an error naming the file; gaps are notes."""
    folder = Path(folder)
    name, config = folder.name, run_config(folder)
    if config:
        method = config.get("method", "agent")
        name = f"agent ({config.get('policy', '?')})" if method == "agent" else method
    samples, notes = {}, []
    for cat_dir in category_dirs(folder):
        type_dirs = sorted(p for p in cat_dir.iterdir() if (p / "image").is_dir())
        if cat_dir.name not in dataset.categories:
            raise tools.UserError(f"{cat_dir}: '{cat_dir.name}' is not a category of {dataset.name} "
                                  f"(known: {', '.join(dataset.categories)})")
        if cat_dir.name not in categories:
            notes.append(f"{cat_dir.name} is not evaluated (not in --categories), its images are left out")
            continue
        for type_dir in type_dirs:
            if type_dir.name not in dataset.types(cat_dir.name):
                raise tools.UserError(f"{type_dir}: {cat_dir.name} has no anomaly type '{type_dir.name}' in "
                                      f"{dataset.name} (its types: {', '.join(dataset.types(cat_dir.name))})")
            for image in sorted(p for p in (type_dir / "image").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                mask = type_dir / "mask" / f"{image.stem}.png"
                if not mask.is_file():
                    raise tools.UserError(f"{image} has no mask {mask}: the localization model "
                                          "trains on each image with its mask")
                samples.setdefault(cat_dir.name, []).append((image, mask, type_dir.name))
    if not samples:
        raise tools.UserError(f"--gen {folder} holds no generated images of {', '.join(categories)}: "
                              f"expected {folder}/<category>/<type>/image/*.png and mask/*.png "
                              "(synthesize.py's layout)")
    for cat in categories:
        if cat not in samples:
            notes.append(f"no images of {cat}: its cells are n/a and its means leave it out")
            continue
        missing = [t for t in dataset.types(cat) if t not in {s[2] for s in samples[cat]}]
        if missing:
            notes.append(f"{cat}: no images of {', '.join(missing)}: the classifier gets no training "
                         "example of that class, so its real test images count as errors")
    return {"name": name, "dir": str(folder), "config": config, "samples": samples, "notes": notes}


def load_generated(samples, side, notes, category):
    """Images, masks and type names of one category's generated samples, resized to side x side."""
    images, masks, sizes = [], [], {}
    for image_path, mask_path, t in samples:
        image, mask = tools.load_image(image_path), tools.load_mask(mask_path)
        key = f"{image.shape[1]}x{image.shape[0]}"
        sizes[key] = sizes.get(key, 0) + 1
        images.append(resize(image, side))
        masks.append(resize(mask, side, nearest=True))
    if len(sizes) > 1:
        notes.append(f"{category}: images of mixed sizes ({', '.join(f'{k}: {n}' for k, n in sorted(sizes.items()))}) "
                     f"were resized to {side}x{side}")
    empty = sum(not m.any() for m in masks)
    if empty:
        notes.append(f"{category}: {empty} of {len(masks)} masks are empty (trained on as anomalies with no defect pixel)")
    return np.stack(images), np.stack(masks), [s[2] for s in samples]


# ==============================================================================================
# The two models: ResNet34 (classification) and DRAEM's discriminative UNet (localization)
# ==============================================================================================

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_tensor(images) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W, normalized as ImageNet models expect."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def resnet34(num_types, pretrained):
    """transformers' ResNet34 with one output per anomaly type; from ImageNet weights when given."""
    from transformers import ResNetConfig, ResNetForImageClassification
    if pretrained == "none":
        return ResNetForImageClassification(ResNetConfig(
            depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512], layer_type="basic", num_labels=num_types))
    try:
        return ResNetForImageClassification.from_pretrained(pretrained, num_labels=num_types,
                                                            ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:160]
        raise tools.UserError(f"--pretrained {pretrained}: cannot load it ({reason}); pass --pretrained "
                              "none to train the ResNet34 from scratch") from None


def conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DiscriminativeUNet(nn.Module):
    """DRAEM's discriminative sub-network (3 in, 2 out here: docs/METHOD.md 7). Encoder: six blocks of
    two 3x3 convolutions of width w, 2w, 4w, 8w, 8w, 8w, max-pooling between them. Decoder: five
    steps back up, each upsampling x2, a 3x3 convolution to width 8w, 4w, 2w, w, w, the encoder's
    map of that scale joined, two 3x3 convolutions; a last 3x3 convolution gives the two logits."""

    def __init__(self, width=64, in_channels=3, out_channels=2):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList(conv_block(cin, cout) for cin, cout in zip([in_channels] + widths, widths))
        outs = [8 * width, 4 * width, 2 * width, width, width]
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        for cin, cout, skip in zip([widths[-1]] + outs[:-1], outs, widths[-2::-1]):
            self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                         nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                         nn.ReLU(inplace=True)))
            self.decoder.append(conv_block(cout + skip, cout))
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, skips[-2::-1]):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def focal_loss(logits, masks, gamma=2.0) -> torch.Tensor:
    """DRAEM's segmentation loss: cross-entropy scaled by (1 - p_true)^gamma, so the many easy
    normal pixels do not drown the few defect pixels."""
    log_p = F.log_softmax(logits, dim=1).gather(1, masks[:, None].long())[:, 0]
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def batches(n, size, rng):
    """A shuffled epoch in batches; a last batch of one is dropped (batch norm needs two)."""
    order = rng.permutation(n)
    return [order[i:i + size] for i in range(0, n, size) if len(order[i:i + size]) > 1 or n == 1]


@torch.no_grad()
def predict(model, images, device, batch=32) -> torch.Tensor:
    """The model's outputs (logits) in evaluation mode, batch norm on its running statistics."""
    model.eval()
    outs = []
    for i in range(0, len(images), batch):
        out = model(to_tensor(images[i:i + batch]).to(device))
        outs.append(getattr(out, "logits", out).cpu())
    return torch.cat(outs)


def pick(history, select_on_test, key):
    """The reported epoch: the last one (fixed schedule) or, with --select-on-test, the best one
    by `key` (each model's own headline metric), as the peers report."""
    return max(history, key=lambda h: h[key]) if select_on_test else history[-1]


def train_classifier(gen_images, gen_labels, real, args, seed, desc) -> dict:
    """ResNet34 trained on the generated images only; accuracy on the real two thirds."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = resnet34(len(real["types"]), args.pretrained).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_all, y_all = to_tensor(gen_images), torch.tensor(gen_labels)
    history = []
    for epoch in (bar := tqdm(range(1, args.epochs + 1), desc=desc, leave=False)):
        model.train()
        for idx in batches(len(x_all), args.batch_size, rng):
            loss = F.cross_entropy(model(x_all[idx].to(args.device)).logits, y_all[idx].to(args.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if args.select_on_test or epoch == args.epochs:
            predicted = predict(model, real["test_images"], args.device).argmax(1).numpy()
            history.append({"epoch": epoch, "accuracy": float((predicted == real["test_labels"]).mean())})
    return pick(history, args.select_on_test, "accuracy")


def localization_metrics(model, real, device) -> dict:
    """Pixel scores are the anomaly channel; an image's score is the max of its 21x21 mean-filtered
    map (DRAEM's rule). Test set: every real test/good image plus the real two thirds."""
    images = np.concatenate([real["good_test"], real["test_images"]])
    masks = np.concatenate([np.zeros((len(real["good_test"]),) + real["test_masks"].shape[1:], bool),
                            real["test_masks"]])
    maps = torch.softmax(predict(model, images, device), dim=1)[:, 1:]
    image_scores = F.avg_pool2d(maps, 21, stride=1, padding=10).amax(dim=(1, 2, 3)).numpy()
    image_labels = np.r_[np.zeros(len(real["good_test"])), np.ones(len(real["test_images"]))]
    pixels = maps[:, 0].numpy()
    return {"image_auroc": roc_auc(image_labels, image_scores),
            "image_ap": average_precision(image_labels, image_scores),
            "image_f1": f1_max(image_labels, image_scores),
            "pixel_auroc": roc_auc(masks, pixels), "pixel_ap": average_precision(masks, pixels),
            "pixel_f1": f1_max(masks, pixels)}


def train_localizer(gen_images, gen_masks, real, args, seed, desc) -> dict:
    """DRAEM's discriminative UNet with focal loss. An epoch is every generated anomaly plus as
    many real normal training images (empty masks), shuffled together: the 50/50 mix."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DiscriminativeUNet(args.unet_width).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    normals = real["good_train"]
    x_gen, m_gen = to_tensor(gen_images), torch.from_numpy(gen_masks)
    x_good = to_tensor(normals)
    m_good = torch.zeros((len(normals),) + gen_masks.shape[1:], dtype=torch.bool)
    history = []
    for epoch in (bar := tqdm(range(1, args.loc_epochs + 1), desc=desc, leave=False)):
        model.train()
        # as many normals as anomalies, cycling through a shuffled order of the normal images
        good = np.resize(rng.permutation(len(normals)), len(x_gen))
        x, m = torch.cat([x_gen, x_good[good]]), torch.cat([m_gen, m_good[good]])
        for idx in batches(len(x), args.batch_size, rng):
            loss = focal_loss(model(x[idx].to(args.device)), m[idx].to(args.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.select_on_test or epoch == args.loc_epochs:
            history.append({"epoch": epoch, **localization_metrics(model, real, args.device)})
    return pick(history, args.select_on_test, "pixel_ap")


# ==============================================================================================
# IS and IC-LPIPS: only where their networks are installed with weights
# ==============================================================================================

def perceptual_networks(device):
    """torch-fidelity's Inception (IS) and LPIPS-VGG (IC-LPIPS), or None and the reason why not.
    Both download their weights on first use, so offline they are only there if cached."""
    try:
        import lpips
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"]).to(device).eval()
        vgg = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    except Exception as e:   # not installed, weights not downloadable, or a broken dependency
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}" if str(e).strip() else type(e).__name__
        return None, ("IS and IC-LPIPS need torch-fidelity's Inception and LPIPS-VGG with their weights "
                      f"(pip install torch-fidelity lpips, online once); here: {reason}")
    return (inception, vgg), None


@torch.no_grad()
def perceptual_metrics(networks, gen_by_type, refs_by_type, device) -> dict:
    """IS (10 splits) and IC-LPIPS (images 256x256 in [-1, 1]) per type, averaged over types."""
    inception, vgg = networks
    is_scores, ic_scores = [], []
    as_uint8 = lambda ims: torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).to(device)
    as_lpips = lambda im: F.interpolate(as_uint8([im]).float() / 127.5 - 1, size=(256, 256), mode="bilinear")
    for t, images in gen_by_type.items():
        logits = inception(as_uint8(images))[0]
        is_scores.append(inception_score(torch.softmax(logits.double(), 1).cpu().numpy(), splits=10)[0])
        value = ic_lpips(images, refs_by_type[t], lambda a, b: float(vgg(as_lpips(a), as_lpips(b)).item()))
        if not np.isnan(value):
            ic_scores.append(value)
    return {"is": float(np.mean(is_scores)), "ic_lpips": float(np.mean(ic_scores)) if ic_scores else None}


# ==============================================================================================
# The report
# ==============================================================================================

def pct(value):
    return "n/a" if value is None else f"{100 * value:.1f}"


def triple(row, prefix):
    values = [row.get(f"{prefix}_{k}") for k in ("auroc", "ap", "f1")]
    return "n/a" if any(v is None for v in values) else "/".join(pct(v) for v in values)


def markdown(results) -> str:
    """One table with methods as rows, as in the paper, then per-category tables and the notes."""
    s = results["settings"]
    schedule = ("each model at its best test epoch, ResNet34 by accuracy, UNet by pixel AP (--select-on-test: "
                "test-set selection, the peers' rule)"
                if s["select_on_test"] else "last epoch of a fixed schedule")
    lines = [f"# Evaluation on {results['data']} ({', '.join(results['categories'])})", "",
             "| method | IS | IC-L | ResNet34 acc % | image AUROC/AP/F1 | pixel AUROC/AP/F1 |",
             "|---|---|---|---|---|---|"]
    for m in results["methods"]:
        mean = m["mean"]
        star = "" if m["complete"] else " *"
        is_ = "n/a" if mean.get("is") is None else f"{mean['is']:.2f}"
        ic = "n/a" if mean.get("ic_lpips") is None else f"{mean['ic_lpips']:.2f}"
        lines.append(f"| {m['name']}{star} | {is_} | {ic} | {pct(mean.get('accuracy'))} | "
                     f"{triple(mean, 'image')} | {triple(mean, 'pixel')} |")
    lines += ["", f"Means over categories; {schedule}. Preset {s['preset']}: ResNet34 "
              f"({'from scratch' if s['pretrained'] == 'none' else s['pretrained']}) {s['epochs']} epoch(s), UNet "
              f"width {s['unet_width']} {s['loc_epochs']} epoch(s), {s['image_size']} px, batch {s['batch_size']}, "
              f"Adam {s['lr']:g}, seed {s['seed']}."]
    if results["perceptual_reason"]:
        lines.append(f"IS, IC-L: n/a. {results['perceptual_reason']}.")
    if any(not m["complete"] for m in results["methods"]):
        lines.append("* a category is missing from this set: its means are over the categories it has.")
    lines += ["", "## Per category", "", "| method | category | generated images | acc % | image AUROC/AP/F1 | "
              "pixel AUROC/AP/F1 |", "|---|---|---|---|---|---|"]
    for m in results["methods"]:
        for cat in results["categories"]:
            row = m["categories"].get(cat)
            lines.append(f"| {m['name']} | {cat} | " + ("0 | missing | n/a | n/a |" if row is None else
                         f"{row['generated']} | {pct(row['accuracy'])} | {triple(row, 'image')} | {triple(row, 'pixel')} |"))
    notes = [f"- {m['name']} ({m['dir']}): {n}" for m in results["methods"] for n in m["notes"]]
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def settings(args) -> dict:
    """Fill the flags left unset from the preset, and check them."""
    args.preset = ("toy" if args.data == "toy" else "paper") if args.preset == "auto" else args.preset
    if args.preset not in PRESETS:
        raise tools.UserError(f"--preset must be auto, toy or paper, not '{args.preset}'")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("epochs", "loc_epochs", "unet_width"):
        if getattr(args, flag) < 1:
            raise tools.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.batch_size < 2:
        raise tools.UserError("--batch-size must be at least 2 (batch norm needs two images)")
    if args.image_size < 32 or args.image_size % 32:
        raise tools.UserError(f"--image-size must be a multiple of 32 (the UNet halves it five times), not {args.image_size}")
    if not args.lr > 0:
        raise tools.UserError(f"--lr must be positive, not {args.lr}")
    if args.threads is not None:
        if args.threads < 1:
            raise tools.UserError(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)
    return {k: getattr(args, k) for k in ("preset", "select_on_test", "seed", *PRESETS["toy"])}


def main(argv=None):
    args = get_args(argv)
    folders = [Path(f) for f in args.gen or [DEFAULT_GEN]]
    notices = dataset_flags(args, folders, [run_config(f) for f in folders])
    config = settings(args)
    dataset = tools.load_dataset(args.data, args.data_root, args.size)
    if args.categories is None:   # the categories the sets hold, the evaluation group's first
        held = {d.name for f in folders for d in category_dirs(f)}
        order = dataset.eval_categories + [c for c in dataset.categories if c not in dataset.eval_categories]
        categories = [c for c in order if c in held] or dataset.eval_categories
    else:
        categories = [dataset.check_category(c) for c in tools.comma_list(args.categories, "--categories")]
    sets = [read_generated(folder, dataset, categories) for folder in folders]
    names = [s["name"] for s in sets]
    for s in sets:   # two sets of one method get their folder's name too
        if names.count(s["name"]) > 1:
            s["name"] = f"{s['name']} [{Path(s['dir']).name}]"
    for notice in notices:
        print(notice)
    out = Path(args.out)
    tools.write_atomic(out / "results.md", "(evaluation in progress)\n")
    try:
        results = evaluate_sets(sets, dataset, categories, config, args)
    except (Exception, KeyboardInterrupt) as e:
        reason = ("interrupted" if isinstance(e, KeyboardInterrupt) else
                  str(e) if isinstance(e, tools.UserError) else f"{type(e).__name__}: {e}")
        tools.write_atomic(out / "results.md", f"(evaluation failed: {reason})\n")
        raise
    tools.write_json(out / "results.json", results)
    table = markdown(results)
    tools.write_atomic(out / "results.md", table)
    print(table + f"written: {out / 'results.json'}, {out / 'results.md'}")


def evaluate_sets(sets, dataset, categories, config, args) -> dict:
    """Train and test the models on every generated set and category: the results behind the table."""
    if args.pretrained != "none":
        resnet34(2, args.pretrained)   # fail now, not after the first category
    networks, perceptual_reason = perceptual_networks(args.device)
    print(f"evaluating {len(sets)} set(s) on {dataset.name}: {', '.join(categories)}"
          + (f"\n{perceptual_reason}" if perceptual_reason else ""))

    rows = {s["name"]: {} for s in sets}
    for cat in categories:
        real = real_sets(dataset, cat, args.image_size)
        for s in sets:
            if cat not in s["samples"]:
                continue
            images, masks, types = load_generated(s["samples"][cat], args.image_size, s["notes"], cat)
            labels = [real["types"].index(t) for t in types]
            # every set's models start from the same weights and batch order: only the data differ
            cls = train_classifier(images, labels, real, args, tools.stable_seed(args.seed, cat, "resnet34"),
                                   f"{s['name']} | {cat} | ResNet34")
            loc = train_localizer(images, masks, real, args, tools.stable_seed(args.seed, cat, "unet"),
                                  f"{s['name']} | {cat} | UNet")
            row = {"generated": len(images), "accuracy": cls["accuracy"], "accuracy_epoch": cls["epoch"],
                   **{k: v for k, v in loc.items() if k != "epoch"}, "localization_epoch": loc["epoch"],
                   "is": None, "ic_lpips": None}
            if networks:
                by_type = {t: [im for im, tt in zip(images, types) if tt == t] for t in sorted(set(types))}
                row.update(perceptual_metrics(networks, by_type, real["refs"], args.device))
            rows[s["name"]][cat] = row
            tqdm.write(f"{s['name']:>24s} | {cat:>10s} | acc {pct(row['accuracy'])} | image "
                       f"{triple(row, 'image')} | pixel {triple(row, 'pixel')}")

    methods = []
    for s in sets:
        per_cat = rows[s["name"]]
        mean = {k: float(np.mean(vals)) if (vals := [r[k] for r in per_cat.values() if r[k] is not None]) else None
                for k in METRICS}
        methods.append({"name": s["name"], "dir": s["dir"], "config": s["config"], "categories": per_cat,
                        "mean": mean, "complete": len(per_cat) == len(categories), "notes": s["notes"]})
    return {"data": dataset.name, "data_root": str(dataset.root), "categories": categories,
            "settings": config, "perceptual_reason": perceptual_reason, "methods": methods}


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
