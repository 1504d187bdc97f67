"""evaluate.py: the metric functions against hand-computed values, the split, the models' plumbing,
a tiny end-to-end comparison on a 2-category toy world, and bad input."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import evaluate
import tools
from conftest import run_script


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread is as fast, and far faster when another job shares the
    cores (oversubscribed threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the metric functions ------------------------------------------------------------------------

def test_ranking_metrics_on_a_hand_computed_case():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # pairs (positive, negative): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4
    assert evaluate.roc_auc(labels, scores) == pytest.approx(0.75)
    # thresholds 0.8: P=1 R=.5; 0.4: P=.5 R=.5; 0.35: P=2/3 R=1 -> AP = .5*1 + .5*2/3
    assert evaluate.average_precision(labels, scores) == pytest.approx(0.5 + 1 / 3)
    # F1 at 0.35: 2 * (2/3 * 1) / (2/3 + 1) = 0.8, the best
    assert evaluate.f1_max(labels, scores) == pytest.approx(0.8)
    # a perfect and an inverted ranking
    assert evaluate.roc_auc([0, 0, 1], [1, 2, 3]) == 1.0 and evaluate.roc_auc([0, 0, 1], [3, 2, 1]) == 0.0
    assert evaluate.average_precision([0, 0, 1], [1, 2, 3]) == 1.0 and evaluate.f1_max([0, 0, 1], [1, 2, 3]) == 1.0


def test_ties_form_one_threshold_whatever_the_order():
    labels, scores = [0, 1, 0, 1], [0.5, 0.5, 0.5, 0.9]
    # 0.9 beats both negatives (2); the 0.5 positive ties both negatives (2 x 1/2) -> 3/4
    assert evaluate.roc_auc(labels, scores) == pytest.approx(0.75)
    # 0.9: P=1, R=.5; the tie group 0.5: P=2/4, R=1 -> AP = .5*1 + .5*.5
    assert evaluate.average_precision(labels, scores) == pytest.approx(0.75)
    assert evaluate.f1_max(labels, scores) == pytest.approx(2 / 3)
    for perm in ([1, 0, 3, 2], [3, 2, 1, 0], [2, 3, 0, 1]):   # the order inside ties changes nothing
        l, s = np.array(labels)[perm], np.array(scores)[perm]
        assert evaluate.roc_auc(l, s) == pytest.approx(0.75)
        assert evaluate.average_precision(l, s) == pytest.approx(0.75)
    # all scores tied: AUROC of chance, AP and F1 of flagging everything
    assert evaluate.roc_auc([0, 1, 1, 0], [7] * 4) == 0.5
    assert evaluate.average_precision([0, 1, 1, 0], [7] * 4) == 0.5
    assert evaluate.f1_max([0, 1, 1, 0], [7] * 4) == pytest.approx(2 / 3)


def test_one_class_inputs_give_a_clear_value_or_error():
    with pytest.raises(ValueError, match="only one class"):
        evaluate.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        evaluate.roc_auc([0, 0], [0.1, 0.2])
    for metric in (evaluate.average_precision, evaluate.f1_max):
        with pytest.raises(ValueError, match="without a positive"):
            metric([0, 0], [0.1, 0.2])
        assert metric([1, 1, 1], [0.3, 0.1, 0.2]) == 1.0   # every label positive: all is found, all is right
    with pytest.raises(ValueError, match="NaN"):
        evaluate.roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="one length"):
        evaluate.average_precision([0, 1, 1], [0.1, 0.2])


def test_ranking_metrics_on_masks_match_their_flattened_pixels():
    rng = np.random.default_rng(0)
    masks, maps = rng.random((3, 8, 8)) > 0.8, rng.random((3, 8, 8))
    assert evaluate.roc_auc(masks, maps) == evaluate.roc_auc(masks.ravel(), maps.ravel())
    # and agree with the pairwise definition of AUROC
    pos, neg = maps[masks], maps[~masks]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert evaluate.roc_auc(masks, maps) == pytest.approx(pairwise)


def test_inception_score_by_hand():
    one_hot = np.eye(4)
    assert evaluate.inception_score(one_hot, splits=1)[0] == pytest.approx(4.0)   # confident and diverse: #classes
    assert evaluate.inception_score(np.full((6, 4), 0.25), splits=3) == pytest.approx((1.0, 0.0))
    # splits matter: each half holds one class only, so each half scores 1
    two_classes = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float)
    assert evaluate.inception_score(two_classes, splits=1)[0] == pytest.approx(2.0)
    assert evaluate.inception_score(two_classes, splits=2) == pytest.approx((1.0, 0.0))
    # p(y|x) = (.5, .5) for one image and (1, 0) for the other: marginal (.75, .25)
    mixed = np.array([[0.5, 0.5], [1.0, 0.0]])
    kl = [0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), math.log(1 / 0.75)]
    assert evaluate.inception_score(mixed, splits=1)[0] == pytest.approx(math.exp(np.mean(kl)))
    assert evaluate.inception_score(one_hot, splits=10)[0] == pytest.approx(1.0)   # fewer images than splits


def test_ic_lpips_by_hand_with_its_cluster_convention():
    dist = lambda a, b: abs(a - b)
    # 1, 2, 3 join reference 0; 9 joins reference 10 alone and has no pair: left out
    assert evaluate.ic_lpips([1, 2, 3, 9], [0, 10], dist) == pytest.approx((1 + 2 + 1) / 3)
    # two clusters with pairs: mean of cluster means, not of all pairs
    assert evaluate.ic_lpips([1, 3, 9, 10, 11, 12], [0, 10], dist) == pytest.approx((2 + (1 + 2 + 3 + 1 + 2 + 1) / 6) / 2)
    assert evaluate.ic_lpips([5], [0, 10], dist) != evaluate.ic_lpips([5], [0, 10], dist)   # NaN: no pair anywhere
    assert evaluate.ic_lpips([5, 5], [0, 10], dist) == 0.0   # a tie joins the first reference; identical -> 0
    # at most 50 members per cluster: the first 50 (values 0..49, then 60 outliers far away)
    members = list(range(50)) + [1000] * 60
    expected = np.mean([abs(a - b) for i, a in enumerate(range(50)) for b in range(i + 1, 50)])
    assert evaluate.ic_lpips(members, [0], dist) == pytest.approx(expected)
    with pytest.raises(ValueError):
        evaluate.ic_lpips([1, 2], [], dist)


# ---- the split and the models --------------------------------------------------------------------

def test_test_set_is_the_last_two_thirds_by_file_name(tmp_path):
    root = tmp_path / "mvtec"
    for i in range(2):
        tools.save_png(np.full((32, 32, 3), 10, np.uint8), root / "bottle" / "train" / "good" / f"{i:03d}.png")
        tools.save_png(np.full((32, 32, 3), 20, np.uint8), root / "bottle" / "test" / "good" / f"{i:03d}.png")
    for value, name in enumerate(["g", "c", "a", "f", "b", "e", "d"]):   # written out of order
        tools.save_png(np.full((32, 32, 3), 100 + value, np.uint8), root / "bottle" / "test" / "crack" / f"{name}.png")
        tools.save_png(np.ones((32, 32), bool), root / "bottle" / "ground_truth" / "crack" / f"{name}_mask.png")
    ds = tools.load_dataset("mvtec", root, 32)
    real = evaluate.real_sets(ds, "bottle", 32)
    # 7 sorted by name: a b c | d e f g; the first third rounded up (3) are references
    value = {"g": 100, "c": 101, "a": 102, "f": 103, "b": 104, "e": 105, "d": 106}
    assert [im[0, 0, 0] for im in real["refs"]["crack"]] == [value[n] for n in "abc"]
    assert [im[0, 0, 0] for im in real["test_images"]] == [value[n] for n in "defg"]
    assert len(real["good_test"]) == 2 and len(real["good_train"]) == 2


def test_unet_shape_focal_loss_and_image_score():
    net = evaluate.DiscriminativeUNet(width=4)
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 2, 64, 64)
    logits, masks = torch.randn(2, 2, 8, 8), torch.rand(2, 8, 8) > 0.7
    ce = torch.nn.functional.cross_entropy(logits, masks.long())
    assert evaluate.focal_loss(logits, masks, gamma=0) == pytest.approx(ce.item(), rel=1e-6)
    assert evaluate.focal_loss(logits, masks) < ce   # confident pixels are down-weighted

    class Oracle(torch.nn.Module):   # reads the defect off the image: the anomaly logit is the red channel
        def forward(self, x):
            red = x[:, :1] * 10
            return torch.cat([-red, red], dim=1)

    rng = np.random.default_rng(0)
    test_masks = np.zeros((4, 64, 64), bool)
    for m in test_masks:
        y, x = rng.integers(10, 40, 2)
        m[y:y + 12, x:x + 12] = True
    images = np.zeros((4, 64, 64, 3), np.uint8)
    images[..., 0] = test_masks * 255
    real = {"good_test": np.zeros((3, 64, 64, 3), np.uint8), "test_images": images, "test_masks": test_masks}
    scores = evaluate.localization_metrics(Oracle(), real, "cpu")
    assert all(v == pytest.approx(1.0) for v in scores.values()), scores


def test_training_is_deterministic_and_selection_on_test_only_flatters(small_world):
    args = evaluate.get_args(["--gen", "x", "--data", "toy", "--image-size", "64", "--loc-epochs", "3", "--unet-width", "4"])
    evaluate.settings(args)
    real = evaluate.real_sets(tools.load_dataset("toy", small_world, 64), "washer", 64)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    masks = rng.random((6, 64, 64)) > 0.9
    a, b = (evaluate.train_localizer(images, masks, real, args, 7, "t") for _ in range(2))
    assert a == b and a["epoch"] == 3
    assert evaluate.train_localizer(images, masks, real, args, 8, "t") != a   # another seed, another model
    args.select_on_test = True
    best = evaluate.train_localizer(images, masks, real, args, 7, "t")
    assert best["pixel_ap"] >= a["pixel_ap"] and (best["epoch"] < 3 or best == a)


# ---- end to end on a 2-category toy world ---------------------------------------------------------

@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "world"
    tools.generate_toy_world(root, size=64, seed=0, counts={"train_good": 4, "test_good": 3, "per_type": 3},
                             categories=["washer", "wood"])
    return root


@pytest.fixture(scope="module")
def two_sets(small_world, tmp_path_factory):
    """The agent on both categories; cutpaste on washer only, with one image at another size."""
    out = tmp_path_factory.mktemp("gen")
    base = ["--data-root", small_world, "--size", "64", "--per-type", "2"]
    assert run_script("synthesize.py", *base, "--out", out / "agent").returncode == 0
    result = run_script("synthesize.py", *base, "--method", "cutpaste", "--categories", "washer", "--out", out / "cut")
    assert result.returncode == 0, result.stderr
    image = out / "cut" / "washer" / "crack" / "image" / "000.png"
    tools.save_png(np.asarray(evaluate.resize(tools.load_image(image), 96)), image)
    return out


def test_end_to_end_compares_methods_and_reports_gaps(small_world, two_sets, tmp_path):
    result = run_script("evaluate.py", "--gen", two_sets / "agent", two_sets / "cut", "--data-root", small_world,
                        "--size", "64", "--image-size", "64", "--epochs", "1", "--loc-epochs", "1",
                        "--threads", "1", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    table = (tmp_path / "eval" / "results.md").read_text()
    assert table in result.stdout                                 # printed at the end
    assert sorted(results["categories"]) == ["washer", "wood"]
    agent, cut = results["methods"]
    assert (agent["name"], cut["name"]) == ("agent (expert)", "cutpaste")
    assert agent["complete"] and set(agent["categories"]) == {"washer", "wood"}
    assert not cut["complete"] and set(cut["categories"]) == {"washer"}
    for method in results["methods"]:
        for row in method["categories"].values():
            for key in ("accuracy", "image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pixel_f1"):
                assert 0 <= row[key] <= 1, (method["name"], key)
            assert row["is"] is None and row["ic_lpips"] is None
    # the mean is over the categories present
    assert cut["mean"]["pixel_ap"] == cut["categories"]["washer"]["pixel_ap"]
    assert agent["mean"]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in agent["categories"].values()]))
    # the table: methods as rows, n/a with a reason, gaps reported
    assert "| agent (expert) | n/a | n/a |" in table and "| cutpaste * | n/a | n/a |" in table
    assert "IS, IC-L: n/a." in table and "lpips" in table
    assert "| cutpaste | wood | 0 | missing |" in table
    assert "no images of wood" in table and "mixed sizes (64x64: 5, 96x96: 1)" in table
    assert "last epoch of a fixed schedule" in table


def test_a_missing_type_is_reported(small_world, two_sets, tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(two_sets / "agent", gen)
    shutil.rmtree(gen / "wood" / "hole")
    sets = evaluate.read_generated(gen, tools.load_dataset("toy", small_world, 64), ["washer", "wood"])
    assert any("wood: no images of hole" in n and "no training example" in n for n in sets["notes"])
    assert {t for *_, t in sets["samples"]["wood"]} == {"color", "scratch", "stain"}


@pytest.mark.parametrize("damage, message", [
    ("empty", "holds no generated images"),
    ("foreign category", "'spaceship' is not a category of toy"),
    ("wrong type", "washer has no anomaly type 'stain'"),
    ("no mask", "has no mask"),
    ("other dataset", "was synthesized on --data mvtec"),
])
def test_bad_generated_folders_are_named(damage, message, small_world, two_sets, tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(two_sets / "agent", gen)
    if damage == "empty":
        shutil.rmtree(gen)
        gen.mkdir()
    elif damage == "foreign category":
        shutil.copytree(gen / "wood", gen / "spaceship")
    elif damage == "wrong type":
        (gen / "washer" / "crack").rename(gen / "washer" / "stain")
    elif damage == "no mask":
        (gen / "wood" / "hole" / "mask" / "001.png").unlink()
    else:
        config = json.loads((gen / "config.json").read_text())
        (gen / "config.json").write_text(json.dumps({**config, "data": "mvtec"}))
    with pytest.raises(tools.UserError, match=message):
        evaluate.main(["--gen", str(gen), "--data", "toy", "--data-root", str(small_world), "--size", "64",
                       "--out", str(tmp_path / "e")])


@pytest.mark.parametrize("args, message", [
    (["--image-size", "100"], "--image-size must be a multiple of 32"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--preset", "huge"], "--preset must be auto, toy or paper"),
    (["--categories", "spaceship"], "unknown category 'spaceship'"),
    (["--pretrained", "/nonexistent/resnet"], "--pretrained /nonexistent/resnet: cannot load it"),
])
def test_bad_flags_are_one_line(args, message, small_world, two_sets, tmp_path):
    result = run_script("evaluate.py", "--gen", two_sets / "agent", "--data-root", small_world, "--size", "64",
                        "--out", tmp_path / "e", *args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr, result.stderr
    if (tmp_path / "e" / "results.md").exists():   # the error came after the evaluation started
        assert (tmp_path / "e" / "results.md").read_text().startswith(f"(evaluation failed: {message}")


# ---- the dataset from the sets' config.json ------------------------------------------------------

TINY = ["--image-size", "32", "--epochs", "1", "--loc-epochs", "1", "--threads", "1"]


def test_the_quick_start_chain_runs_without_flags(tmp_path):
    """python synthesize.py, then python evaluate.py as written: runs/synth on the toy world."""
    result = run_script("evaluate.py", *TINY, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == ("error: --gen runs/synth does not exist or is not a folder: "
                                     "run python synthesize.py first")
    assert run_script("synthesize.py", "--per-type", "1", cwd=tmp_path).returncode == 0
    result = run_script("evaluate.py", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())
    config = json.loads((tmp_path / "runs" / "synth" / "config.json").read_text())
    assert results["data"] == "toy" and results["data_root"] == config["data_root"]
    assert results["categories"] == ["wood", "leather", "bottle", "washer"]   # what synthesize.py made
    [agent] = results["methods"]
    assert agent["dir"] == "runs/synth" and agent["complete"] and "note:" not in result.stdout


def test_a_set_of_another_size_needs_no_data_flags(small_world, two_sets, tmp_path):
    """The sets were made with --size 64 on small_world; --data-root given elsewhere wins, with a notice."""
    result = run_script("evaluate.py", "--gen", two_sets / "agent", "--categories", "washer", *TINY,
                        "--out", tmp_path / "e", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["data_root"] == str(small_world.resolve()) and "note:" not in result.stdout
    assert results["methods"][0]["categories"]["washer"]["generated"] == 6

    copy = tmp_path / "world-copy"
    shutil.copytree(small_world, copy)
    result = run_script("evaluate.py", "--gen", two_sets / "agent", "--data-root", copy, "--categories", "washer",
                        *TINY, "--out", tmp_path / "e2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"note: --data-root {copy} given; {two_sets / 'agent'} was synthesized with --data-root " \
           f"{small_world.resolve()} (its config.json)" in result.stdout
    assert json.loads((tmp_path / "e2" / "results.json").read_text())["data_root"] == str(copy)


@pytest.mark.parametrize("change", [{"data": "mvtec"}, {"size": 96}])
def test_sets_of_different_datasets_are_refused(change, small_world, two_sets, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_sets / "agent", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, **change}))
    result = run_script("evaluate.py", "--gen", two_sets / "agent", other, "--out", tmp_path / "e", cwd=tmp_path)
    assert result.returncode != 0
    line = result.stderr.strip()
    assert line.splitlines() == [line] and "made from different datasets or image sides" in line, line
    assert f"{two_sets / 'agent'}: toy, 64 px" in line
    assert f"{other}: {change.get('data', 'toy')}, {change.get('size', 64)} px" in line


def test_a_real_dataset_comes_from_the_config(tmp_path):
    gen = tmp_path / "mvtec-set"
    gen.mkdir()
    args = evaluate.get_args(["--gen", str(gen)])
    config = {"data": "mvtec", "data_root": str(tmp_path), "size": 256, "method": "agent"}
    assert evaluate.dataset_flags(args, [gen], [config]) == []
    assert (args.data, args.data_root, args.size) == ("mvtec", str(tmp_path), 256)
    assert evaluate.settings(args)["preset"] == "paper"   # the real-data preset, as with --data mvtec
    with pytest.raises(tools.UserError, match="names the dataset folder /gone, which is not here; pass --data-root"):
        evaluate.dataset_flags(evaluate.get_args([]), [gen], [{**config, "data_root": "/gone"}])
