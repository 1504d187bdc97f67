"""build_trajectories.py: reverse synthesis and the structure of the trajectories it writes."""
import json

import numpy as np
import pytest
from scipy import ndimage

import tools
from conftest import run_script

import build_trajectories as build


@pytest.fixture(scope="module")
def built(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "out"
    result = run_script("build_trajectories.py", "--data-root", toy_root, "--out", out, "--limit", "40",
                        "--kr-prob", "0.7")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for name in ("train", "val") for line in (out / f"{name}.jsonl").read_text().splitlines()]
    return out, records, result.stdout


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


def test_the_real_anomaly_passes_last_and_weaker_attempts_fail(built, toy):
    out, records, _ = built
    for r in records:
        scores = [json.loads(tools.message_text(m))["score"] for m in r["messages"]
                  if m["role"] == "tool" and m["name"] == "quality_eval"]
        assert scores[-1] >= tools.PASS_SCORE and all(s < tools.PASS_SCORE for s in scores[:-1])
        final = [m for m in r["messages"] if m["role"] == "tool" and m["name"] == "image_gen"][-1]
        cat, t, stem = r["id"].split("/")
        real = toy.load(toy_root_image(toy, cat, t, stem))
        assert np.array_equal(tools.load_image(out / final["content"][1]["image"]), real)
        for path in r["images"]:
            assert (out / path).is_file()


def toy_root_image(toy, cat, t, stem):
    return next(a.image for a in toy.anomalies_of(cat, t) if a.image.stem == stem)


def test_prompts_name_the_real_defects_place_and_size(built, toy):
    _, records, _ = built
    for r in records:
        cat, t, stem = r["id"].split("/")
        mask = toy.load_mask(next(a.mask for a in toy.anomalies_of(cat, t) if a.image.stem == stem))
        prompt = [tools.parse_turn(m["content"]).call["arguments"]["prompt"] for m in r["messages"]
                  if m["role"] == "assistant" and "image_gen" in m["content"]][-1]
        assert f"about {tools.extent_px(mask)} pixels" in prompt
        cy, cx = ndimage.center_of_mass(mask)
        where = [n for n, row, col in build.POSITIONS if row == min(int(cy * 3 / 128), 2) and col == min(int(cx * 3 / 128), 2)][0]
        assert f"in the {where}" in prompt or "at the edge of" in prompt


def test_remove_defect_leaves_the_rest_identical(toy):
    for cat in toy.train_categories:
        for t in toy.types(cat):
            a = toy.anomalies_of(cat, t)[0]
            image, mask = toy.load(a.image), toy.load_mask(a.mask)
            clean = build.remove_defect(image, mask)
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
