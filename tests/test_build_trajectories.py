"""build_trajectories.py: reverse synthesis and the structure of the trajectories it writes."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import tools
from conftest import ROOT, run_script

import build_trajectories as build


@pytest.fixture(scope="module")
def built(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "out"
    result = run_script("build_trajectories.py", "--data-root", toy_root, "--out", out, "--limit", "40",
                        "--kr-prob", "0.7", "--format", "llamafactory")
    assert result.returncode == 0, result.stderr
    return out, read_live(out), result.stdout


def read_live(out):
    """The trajectories in their in-memory form (contents as strings, images by path)."""
    rows = [json.loads(line) for name in ("train", "val") for line in (out / f"{name}.jsonl").read_text().splitlines()]
    return [{**r, "messages": tools.live_conversation(r["messages"], r["images"])} for r in rows]


def calls(record):
    return [tools.parse_turn(m["content"]).call["name"] if tools.parse_turn(m["content"]).call else "answer"
            for m in record["messages"] if m["role"] == "assistant"]


def test_tool_order_and_the_distribution_of_attempts(built, toy):
    out, records, stdout = built
    assert "N=1" in stdout and "N=2" in stdout and "N=3" in stdout
    assert {r["n_attempts"] for r in records} == {1, 2, 3}
    assert {r["category"] for r in records} <= set(toy.train_categories)   # never the evaluation group
    with_kr = 0
    for r in records:
        c = calls(r)
        assert c[:3] == ["prompt_gen", "image_gen", "quality_eval"] and c[-2:] == ["mask_gen", "answer"]
        assert c.count("image_gen") == c.count("quality_eval") == r["n_attempts"]
        with_kr += "knowledge_retrieval" in c
        if "knowledge_retrieval" in c:   # only ever right after a failed quality check
            assert c[c.index("knowledge_retrieval") - 1] == "quality_eval"
        assert all(tools.parse_turn(m["content"]).well_formed for m in r["messages"] if m["role"] == "assistant")
    assert 0 < with_kr < len(records)


def qe_scores(record):
    return [json.loads(tools.message_text(m))["score"] for m in record["messages"]
            if m["role"] == "tool" and m["name"] == "quality_eval"]


def test_the_real_anomaly_passes_last_and_weaker_attempts_fail(built, toy):
    out, records, _ = built
    for r in [r for r in records if not r["attempts_ran_out"]]:
        scores = qe_scores(r)
        assert scores[-1] >= tools.PASS_SCORE and all(s < tools.PASS_SCORE for s in scores[:-1])
        final = [m for m in r["messages"] if m["role"] == "tool" and m["name"] == "image_gen"][-1]
        cat, t, stem = r["id"].split("/")
        real = toy.load(toy_root_image(toy, cat, t, stem))
        assert np.array_equal(tools.load_image(out / final["content"][1]["image"]), real)
        for path in r["images"]:
            assert (out / path).is_file()


def toy_root_image(toy, cat, t, stem):
    return next(a.image for a in toy.anomalies_of(cat, t) if a.image.stem == stem)


def test_attempts_that_run_out_end_on_the_last_failed_one(built):
    out, records, stdout = built
    ran_out = [r for r in records if r["attempts_ran_out"]]
    assert ran_out and "attempts ran out" in stdout
    ids = {r["id"] for r in records}
    for r in ran_out:
        assert r["id"].removesuffix("-ran-out") in ids            # a second trajectory of a used anomaly
        assert r["n_attempts"] == 3 and len(calls(r)) <= 10         # fits the runner's max_turns
        scores = qe_scores(r)
        assert len(scores) == 3 and all(s < tools.PASS_SCORE for s in scores)
        judged = [json.loads(tools.message_text(m))["image_index"] for m in r["messages"]
                  if m["role"] == "tool" and m["name"] == "quality_eval"]
        turns = [tools.parse_turn(m["content"]) for m in r["messages"] if m["role"] == "assistant"]
        assert turns[-2].call["arguments"]["anomaly_image"] == judged[-1] == 4
        assert turns[-1].answer["final_image_index"] == judged[-1] and turns[-1].answer["status"] == "partial"


def test_ran_out_trajectories_leave_the_passing_ones_unchanged(built, toy_root, tmp_path):
    out, records, _ = built
    result = run_script("build_trajectories.py", "--data-root", toy_root, "--out", tmp_path / "o", "--limit", "40",
                        "--kr-prob", "0.7", "--ran-out-prob", "0")
    assert result.returncode == 0, result.stderr
    plain = read_live(tmp_path / "o")
    assert not any(r["attempts_ran_out"] for r in plain) and "attempts ran out" not in result.stdout
    assert [r["messages"] for r in plain] == [r["messages"] for r in records if not r["attempts_ran_out"]]


def image_prompts(record):
    """The image_gen prompts of a trajectory, in order."""
    return [tools.parse_turn(m["content"]).call["arguments"]["prompt"] for m in record["messages"]
            if m["role"] == "assistant" and "image_gen" in m["content"]]


def test_prompts_name_the_real_defects_place_and_size(built, toy):
    _, records, _ = built
    for r in [r for r in records if not r["attempts_ran_out"]]:
        cat, t, stem = r["id"].split("/")
        mask = toy.load_mask(next(a.mask for a in toy.anomalies_of(cat, t) if a.image.stem == stem))
        prompt = image_prompts(r)[-1]
        assert f"about {tools.extent_px(mask)} pixels" in prompt
        cy, cx = ndimage.center_of_mass(mask)
        where = [n for n, row, col in build.POSITIONS if row == min(int(cy * 3 / 128), 2) and col == min(int(cx * 3 / 128), 2)][0]
        assert f"in the {where}" in prompt or "at the edge of" in prompt


def test_a_colour_defect_is_written_by_its_colour_alone_and_no_weak_attempt_repeats_the_final(built):
    """The knowledge calls pill contamination a colour change (brown): the passing prompt names the
    colour with no dark/bright word, which makes the painter darken instead of tint."""
    _, records, _ = built
    knowledge = tools.KnowledgeBase()
    colour_types = 0
    for r in records:
        cat, t, _ = r["id"].split("/")
        entry = knowledge.lookup(cat, t, "toy")
        prompts = image_prompts(r)
        if not r["attempts_ran_out"]:
            assert prompts[-1] not in prompts[:-1]
            if entry["attributes"]["tone"] == "colour":
                colour_types += 1
                look = prompts[-1].split(": ", 1)[1]
                assert not look.startswith(("a dark ", "a bright ")), look
    assert colour_types > 0


def test_exemplar_fill_leaves_the_rest_identical(toy):
    for cat in toy.train_categories:
        for t in toy.types(cat):
            a = toy.anomalies_of(cat, t)[0]
            image, mask = toy.load(a.image), toy.load_mask(a.mask)
            clean = tools.exemplar_fill(image, mask)
            grown = ndimage.binary_dilation(mask, iterations=2)
            assert np.array_equal(clean[~grown], image[~grown])
            assert tools.change_map(image, clean)[mask].mean() > 10          # the defect is gone


def test_bad_input(tmp_path, built):
    out, _, _ = built
    root = tmp_path / "mvtec" / "bottle"
    for split in ("train", "test"):
        (root / split / "good").mkdir(parents=True)
        tools.save_png(np.zeros((32, 32, 3), np.uint8), root / split / "good" / "000.png")
    result = run_script("build_trajectories.py", "--data", "mvtec", "--data-root", tmp_path / "mvtec",
                        "--categories", "bottle", "--out", tmp_path / "o")
    assert result.returncode != 0 and "no labelled anomalies" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_script("build_trajectories.py", "--out", out)
    assert result.returncode != 0 and "already holds trajectories" in result.stderr
    result = run_script("build_trajectories.py", "--ran-out-prob", "1.5", "--out", tmp_path / "o")
    assert result.returncode != 0 and "--ran-out-prob must be between 0 and 1" in result.stderr
    for flags, message in [(["--limit", "0"], "--limit must be at least 1, got 0"),
                           (["--limit", "-1"], "--limit must be at least 1, got -1"),
                           (["--val-fraction", "1"], "--val-fraction must be at least 0 and below 1")]:
        with pytest.raises(tools.UserError, match=message):
            build.main([*flags, "--out", str(tmp_path / "o")])


def test_the_stored_format_reads_from_anywhere_with_json_and_pillow(built, tmp_path):
    """TRL's format: contents are lists of parts, image parts bare placeholders, "images" the files in
    order, relative to the file's folder; read as the README shows, from another working directory."""
    out, _, _ = built
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    for row in rows:
        assert "tools" not in row and all(isinstance(m["content"], list) for m in row["messages"])
        parts = [p for m in row["messages"] for p in m["content"]]
        assert all(p == {"type": "image"} for p in parts if p["type"] == "image")
        assert sum(p["type"] == "image" for p in parts) == len(row["images"])
        # in placeholder order, which is the agent's numbering of the images
        assert row["images"] == [f"images/{row['id']}/{k}.png" for k in range(1, len(row["images"]) + 1)]
    readme = (ROOT / "README.md").read_text()
    example = readme.split("<!-- trajectory-loading -->")[1].split("```python\n")[1].split("```")[0]
    assert len(example.strip().splitlines()) == 3
    check = (f"folder = __import__('pathlib').Path({str(out)!r})\n" + example +
             "assert len(images) == len(rows) and all(i.size == (128, 128) for row in images for i in row)\n"
             "print(sum(map(len, images)))")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == sum(len(r["images"]) for r in rows)


def test_the_llamafactory_export_has_one_placeholder_per_image(built):
    out, _, _ = built
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["anomalyagent_train"]["formatting"] == "sharegpt"
    assert info["anomalyagent_train"]["tags"]["observation_tag"] == "tool"
    stored = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    shared = [json.loads(line) for line in (out / info["anomalyagent_train"]["file_name"]).read_text().splitlines()]
    assert len(shared) == len(stored)
    for row, mine in zip(shared, stored):
        assert sum(m["content"].count("<image>") for m in row["messages"]) == len(row["images"]) > 0
        assert row["images"] == mine["images"] and all((out / p).is_file() for p in row["images"])
        roles = [m["role"] for m in row["messages"]]
        # sharegpt: a system prompt, then user or tool turns alternating with assistant turns
        assert roles[0] == "system" and roles[1] == "user" and roles[-1] == "assistant"
        assert all(r == "assistant" for r in roles[2::2]) and all(r == "tool" for r in roles[3::2])


# What the fixture's run writes, pinned: a change that alters trajectories (text or images) must be
# a decision, made by updating this digest, never a side effect of a refactor.
TRAJECTORY_DIGEST = "7e8775283e829b34"   # the TRL format; the judge calibrated on the references (--references on)


def test_trajectories_match_the_pinned_digest(built):
    out, _, _ = built
    digest = hashlib.sha256()
    for name in ("train.jsonl", "val.jsonl"):
        digest.update((out / name).read_bytes())
    for path in sorted((out / "images").rglob("*.png")):
        with Image.open(path) as image:   # the pixels, not the PNG encoder's bytes
            digest.update(str(path.relative_to(out)).encode() + np.asarray(image).tobytes())
    assert digest.hexdigest()[:16] == TRAJECTORY_DIGEST


def test_aligned_fill_restores_a_fixed_pose_object_that_exemplar_fill_cannot():
    """A disc with a bright rim and a printed mark on it, photographed in a fixed pose (small shifts):
    a defect over the mark is restored from the best-aligned normal image; exemplar fill, which can
    only copy other parts of the same photo, cannot bring the mark back."""
    side = 128
    yy, xx = np.mgrid[:side, :side]

    def photo(cy, cx, seed):
        r = np.hypot(yy - cy, xx - cx)
        grey = np.where(r < 40, 120.0, 30.0)
        grey[(r >= 34) & (r < 40)] = 220.0                                   # the rim
        grey[(np.abs(xx - cx) < 5) & (yy > cy - 40) & (yy < cy - 33)] = 60.0   # the mark on it
        noisy = grey + np.random.default_rng(seed).normal(0, 2, grey.shape)
        return np.repeat(np.clip(noisy, 0, 255)[..., None], 3, axis=2).astype(np.uint8)

    normals = [photo(64 + dy, 64 + dx, i) for i, (dy, dx) in enumerate([(0, 0), (3, -2), (-2, 3), (1, 4)])]
    truth = photo(65, 62, 9)
    mask = (np.hypot(yy - 28, xx - 62) < 8)
    anomaly = truth.copy()
    anomaly[mask] = 5
    aligned, how = tools.clean_counterpart(anomaly, mask, "object", normals, fixed_pose=True)
    assert how == "aligned"
    far = ~ndimage.binary_dilation(mask, iterations=8)
    assert np.array_equal(aligned[far], anomaly[far])                    # only the defect's region changes
    error = lambda clean: tools.change_map(clean, truth)[mask].mean()
    exemplar, how = tools.clean_counterpart(anomaly, mask, "object", normals, fixed_pose=False)
    assert how == "exemplar" and tools.clean_counterpart(anomaly, mask, "texture", normals, True)[1] == "exemplar"
    assert error(aligned) < 10 and error(exemplar) > 2 * error(aligned), (error(aligned), error(exemplar))
    assert tools.normal_residual(normals, mask) < 10


def test_an_mvtec_layout_folder_keeps_most_real_anomalies_and_says_why_it_skips_one(tmp_path):
    tools.generate_toy_world(tmp_path / "mvtec", size=128, seed=1, categories=["nut"],
                             counts={"train_good": 3, "test_good": 1, "per_type": 3})
    result = run_script("build_trajectories.py", "--data", "mvtec", "--data-root", tmp_path / "mvtec",
                        "--size", "128", "--ran-out-prob", "0", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "offline stand-ins" in result.stdout.splitlines()[0]
    records = [json.loads(line) for name in ("train", "val")
               for line in (tmp_path / "o" / f"{name}.jsonl").read_text().splitlines()]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped ")]
    assert len(records) + len(skipped) == 12 and len(records) >= 0.8 * 12
    assert all("quality_eval scores the real anomaly" in line for line in skipped)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["dataset"] == "mvtec" and manifest["categories"] == ["nut"] and manifest["references"]
    assert "clean counterparts" in result.stdout
