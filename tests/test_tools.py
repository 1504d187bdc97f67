"""The five tools: knowledge, prompt writer, painter, judge and segmenter, on toy-world images."""

import numpy as np
import pytest
from scipy import ndimage

import tools


@pytest.fixture(scope="module")
def kb():
    return tools.KnowledgeBase()


def normal(toy, category, i=0):
    return toy.load(toy.train_good[category][i])


def paint(image, prompt, kind, seed=0, region=None):
    return tools.ProceduralPainter().edit(image, prompt, kind, np.random.default_rng(seed), region)


# ---- knowledge retrieval -------------------------------------------------------------------------

def test_knowledge_covers_mvtec_visa_and_the_toy_world(kb, toy):
    mvtec = kb.data["mvtec"]
    assert len(mvtec) == 15 and sum(len(c["types"]) for c in mvtec.values()) == 73
    assert len(kb.data["visa"]) == 12
    for cat in toy.categories:
        for t in toy.types(cat):
            assert kb.lookup(cat, t, "toy")["dataset"] == "toy"
    vocab = {"shape": set(tools.SHAPE_PHRASES), "tone": {"darker", "brighter", "colour", "background"},
             "where": {"anywhere", "edge", "interior"}, "edge": {"soft", "crisp"}}
    for ds in kb.data.values():
        for cat in ds.values():
            for entry in cat["types"].values():
                a = entry["attributes"]
                assert all(a[k] in v for k, v in vocab.items())
                assert 0 < a["extent"][0] < a["extent"][1] < 1
                assert a["colour"] is None or a["colour"] in tools.COLOURS


def test_knowledge_lookup_tolerates_case_spacing_and_underscores(kb):
    for item, kind in [("Metal Nut", "scratch"), ("metal-nut", "Scratch"), ("METAL_NUT", " scratch ")]:
        assert kb.lookup(item, kind)["category"] == "metal_nut"
    assert kb.lookup("bottle", "broken large", "mvtec")["type"] == "broken_large"
    # the toy world reuses "bottle": the task's dataset decides which entry is meant
    assert kb.lookup("bottle", "crack", "toy")["dataset"] == "toy"


def test_knowledge_retrieval_names_the_known_keys_on_a_miss(toy):
    task = tools.Task(id="x", category="nut", anomaly_type="scratch", image=normal(toy, "nut"), kind="object")
    session = tools.Toolbox().session(task)
    with pytest.raises(tools.ToolError, match="known types: contamination, crack, missing, scratch"):
        session.call("knowledge_retrieval", {"item_name": "nut", "anomaly_type": "melted"})
    with pytest.raises(tools.ToolError, match="known items: .*hazelnut"):
        session.call("knowledge_retrieval", {"item_name": "spaceship", "anomaly_type": "dent"})
    result, images = session.call("knowledge_retrieval", {"item_name": "Nut", "anomaly_type": "SCRATCH"})
    assert "scratch" in result["context"] and result["attributes"]["shape"] == "line" and images == []


# ---- prompt generation ---------------------------------------------------------------------------

def test_prompt_gen_writes_a_local_edit_prompt_the_painter_reads_right(kb):
    painter, rng = tools.ProceduralPainter(), np.random.default_rng(0)
    for name, dataset in kb.data.items():
        for cat, spec in dataset.items():
            for t in spec["types"]:
                entry = kb.lookup(cat, t, name)
                p = tools.OfflinePromptWriter().write(None, entry, rng)
                assert p.startswith(f"Using the provided image, change only {entry['attributes']['part']}")
                assert p.endswith("Keep the rest of the image unchanged.")
                # the shape it asks for is the shape painted, whatever the type or part is called
                assert painter.read(p, 128, rng).family == entry["attributes"]["shape"], (cat, t, p)


def test_the_experts_rewritten_prompt_is_read_as_intended(toy):
    box = tools.Toolbox()
    for cat in toy.categories:
        for t in toy.types(cat):
            task = tools.Task(id="x", category=cat, anomaly_type=t, image=normal(toy, cat), kind=toy.kinds[cat])
            entry = box.entry(task)
            reply = tools.ExpertPolicy()._generate(cat, t, 128, {"attributes": entry["attributes"]}, {},
                                                   np.random.default_rng(0), "")
            prompt = tools.parse_turn(reply).call["arguments"]["prompt"]
            spec = box.editor.read(prompt, 128, np.random.default_rng(0))
            assert spec.family == entry["attributes"]["shape"] or (spec.family, toy.kinds[cat]) == ("notch", "texture")
            assert spec.strength > 0.75 and spec.soft == (entry["attributes"]["edge"] == "soft" and spec.family != "notch")


# ---- image generation: measurements of what the painter makes ------------------------------------

def change(a, b):
    """The visibly changed pixels."""
    return tools.change_map(a, b) > 10


def test_painter_is_deterministic_and_prompts_matter(toy):
    img = normal(toy, "wood")
    p = "a clearly visible dark round hole about 12 pixels across"
    assert np.array_equal(paint(img, p, "texture", 5), paint(img, p, "texture", 5))
    assert not np.array_equal(paint(img, p, "texture", 5), paint(img, p, "texture", 6))
    a = paint(img, p, "texture", 5)
    b = paint(img, "a clearly visible bright thin scratch line about 60 pixels long", "texture", 5)
    assert tools.extent_px(change(img, b)) > 2 * tools.extent_px(change(img, a))
    with pytest.raises(tools.ToolError, match="names no defect"):
        paint(img, "please make it look a bit worse", "texture")


def test_scratch_is_thin_and_long(toy):
    img = normal(toy, "wood")
    for seed in range(5):
        out = paint(img, "a clearly visible bright thin scratch line about 45 pixels long, crisp edges",
                    "texture", seed)
        region = change(img, out)
        length = tools.extent_px(region)
        assert 35 <= length <= 55
        assert region.sum() / length <= 3.5                      # a line, 1-3 px wide
        assert tools.elongation(region) > 4
        assert tools.luminance(out[region][None]).mean() > tools.luminance(img[region][None]).mean()


def test_hole_is_a_dark_compact_spot(toy):
    img = normal(toy, "wood")
    for seed in range(5):
        out = paint(img, "a clearly visible dark round hole about 12 pixels across", "texture", seed)
        region = change(img, out)
        assert tools.elongation(region) < 1.6 and 8 <= tools.extent_px(region) <= 16
        assert (tools.luminance(out[region][None]) - tools.luminance(img[region][None])).mean() < -40


def test_colour_changes_hue_not_brightness(toy):
    img = normal(toy, "leather")
    out = paint(img, "a clearly visible blue discoloured patch about 25 pixels across", "texture", 1)
    region = change(img, out)
    before, after = img[region].astype(float), out[region].astype(float)
    hue_shift = (after - after.mean(1, keepdims=True)).mean(0) - (before - before.mean(1, keepdims=True)).mean(0)
    assert hue_shift[2] > 20 and hue_shift[0] < -10                 # towards blue, away from red
    dl = tools.luminance(after[None]).mean() - tools.luminance(before[None]).mean()
    assert abs(dl) < 0.3 * np.abs(after - before).mean(1).mean() + 5   # texture shading kept


def test_missing_removes_material_at_the_outline(toy):
    img = normal(toy, "washer")
    fg = tools.foreground_mask(img, "object")
    bg = tools.background_colour(img)
    for seed in range(4):
        out = paint(img, "a missing chunk broken off about 20 pixels across", "object", seed)
        region = change(img, out)
        assert region.any() and (region <= fg).all()              # only object pixels changed
        assert np.linalg.norm(out[region] - bg, axis=1).mean() < 0.3 * np.linalg.norm(img[region] - bg, axis=1).mean()
        solid = ndimage.binary_fill_holes(fg)
        outline = solid & ~ndimage.binary_erosion(solid)
        assert (region & ndimage.binary_dilation(outline, iterations=2)).any()


def test_painter_paints_only_on_the_object_and_inside_the_region(toy):
    img = normal(toy, "bottle")
    fg = tools.foreground_mask(img, "object")
    for seed in range(6):
        out = paint(img, "a large dark brown irregular blob stain", "object", seed)
        assert (change(img, out) <= fg).all()
    out = paint(img, "a dark brown stain", "object", 0, region=[20, 40, 50, 60])   # x0, y0, x1, y1
    ys, xs = np.nonzero(tools.change_map(img, out) > 0)
    assert ys.min() >= 40 and ys.max() < 60 and xs.min() >= 20 and xs.max() < 50


def test_samples_of_one_prompt_differ_in_place_shape_and_size(toy):
    img = normal(toy, "tile")
    regions = [change(img, paint(img, "a dark brown irregular blob stain", "texture", s)) for s in range(8)]
    centres = [ndimage.center_of_mass(r) for r in regions]
    assert len({(round(y / 8), round(x / 8)) for y, x in centres}) >= 6
    sizes = [r.sum() for r in regions]
    assert max(sizes) > 1.5 * min(sizes)


def test_painter_draws_what_the_prompt_leaves_open_from_the_references(toy):
    img = normal(toy, "bottle")
    side = img.shape[0]
    solid = ndimage.binary_fill_holes(tools.foreground_mask(img, "object"))
    outline = ndimage.binary_dilation(solid & ~ndimage.binary_erosion(solid), iterations=2)
    painter = tools.ProceduralPainter()
    extents = {}
    for expected in ({"extent": [0.30, 0.36], "where": "edge"}, {"extent": [0.08, 0.10], "where": "interior"}):
        sizes = []
        for seed in range(5):
            out = painter.edit(img, "a clearly visible dark round spot", "object", np.random.default_rng(seed),
                               expected=expected)
            region = change(img, out)
            sizes.append(tools.extent_px(region) / side)
            assert bool((region & outline).any()) == (expected["where"] == "edge")
        # the painted footprint measures a little larger than the drawn extent (its rough outline, the blur)
        assert expected["extent"][0] * 0.8 <= np.median(sizes) <= expected["extent"][1] * 1.5
        extents[expected["where"]] = sizes
    assert min(extents["edge"]) > max(extents["interior"])
    # what the prompt says wins over the references
    out = painter.edit(img, "a clearly visible dark round spot about 10 pixels across", "object",
                       np.random.default_rng(0), expected={"extent": [0.30, 0.36], "where": "edge"})
    assert tools.extent_px(change(img, out)) <= 16


def test_the_session_gives_the_editor_its_types_references(toy):
    seen = []

    class Recorder(tools.ProceduralPainter):
        def edit(self, image, prompt, kind, rng, region=None, expected=None):
            seen.append(expected)
            return super().edit(image, prompt, kind, rng, region, expected)

    reference = {"extent": [0.2, 0.25], "where": "anywhere"}
    task = tools.make_task(toy, tools.plan_tasks(toy, "bottle", per_type=1)[0])
    box = tools.Toolbox(editor=Recorder(), references={f"bottle/{task.anomaly_type}": reference})
    box.session(task).call("image_gen", {"prompt": "a dark spot", "target_image": 1})
    tools.Toolbox(editor=Recorder()).session(task).call("image_gen", {"prompt": "a dark spot", "target_image": 1})
    assert seen == [reference, None]


# ---- quality evaluation ----------------------------------------------------------------------------

def judge(img, out, kind, kb, cat, t):
    return tools.MeasuredJudge().evaluate(img, out, kind, kb.lookup(cat, t, "toy"))


def test_judge_passes_a_faithful_defect_and_explains_failures(toy, kb):
    img = normal(toy, "wood")
    good = paint(img, "a clearly visible dark brown irregular blob about 22 pixels across, "
                      "with soft, blended edges", "texture", 3)
    r = judge(img, good, "texture", kb, "wood", "stain")
    assert r["score"] >= tools.PASS_SCORE and r["score"] == round(r["location_score"] + r["quality_score"], 1)
    faint = paint(img, "a faint dark brown irregular blob about 22 pixels across, with soft, blended edges",
                  "texture", 3)
    r2 = judge(img, faint, "texture", kb, "wood", "stain")
    assert r2["score"] < r["score"] and "too faint" in r2["review"]
    hard = paint(img, "a clearly visible dark brown irregular blob about 22 pixels across, with "
                      "sharp edges", "texture", 3)
    assert "pasted-on edges" in judge(img, hard, "texture", kb, "wood", "stain")["review"]
    big = paint(img, "a clearly visible dark brown irregular blob about 70 pixels across, with soft, "
                     "blended edges", "texture", 3)
    r4 = judge(img, big, "texture", kb, "wood", "stain")
    assert "too large" in r4["review"] and r4["location_score"] < r["location_score"]
    bright = paint(img, "a clearly visible bright irregular blob about 22 pixels across, with soft, "
                        "blended edges", "texture", 3)
    assert "should be darker" in judge(img, bright, "texture", kb, "wood", "stain")["review"]
    nothing = judge(img, img.copy(), "texture", kb, "wood", "stain")
    assert nothing["score"] == 0 and "No visible change" in nothing["review"]


def test_judge_checks_the_place_on_objects(toy, kb):
    img = normal(toy, "washer")
    inner = paint(img, "a clearly visible missing chunk about 20 pixels across", "object", 2)
    assert "touch the outline" not in judge(img, inner, "object", kb, "washer", "missing")["review"]
    # a "missing" defect painted as a dark spot in the middle of the face is in the wrong place
    middle = paint(img, "a clearly visible dark round hole about 12 pixels across, away from the outline",
                   "object", 2)
    r = judge(img, middle, "object", kb, "washer", "missing")
    assert "touch the outline" in r["review"] and r["score"] < tools.PASS_SCORE


def test_judge_accepts_the_toy_worlds_own_defects(kb):
    """The toy world's defects are rendered by separate, physical code: the judge must pass them."""
    results = []
    for cat, spec in tools.TOY_CATEGORIES.items():
        for t in spec["types"]:
            for seed in range(4):
                rng = np.random.default_rng([seed, tools.stable_seed(cat, t)])
                img, fg = tools.render_normal(cat, rng, 128)
                out, _ = tools.render_anomaly(cat, t, img, fg, rng)
                r = judge(img, out, spec["kind"], kb, cat, t)
                results.append((r["score"] >= tools.PASS_SCORE, cat, t, r["score"], r["review"]))
    failed = [r[1:] for r in results if not r[0]]
    assert len(failed) <= 0.1 * len(results), failed


# ---- mask generation --------------------------------------------------------------------------------

def test_mask_gen_recovers_the_changed_region(toy):
    img = normal(toy, "tile")
    out = paint(img, "a clearly visible dark jagged crack about 50 pixels long", "texture", 4)
    mask = tools.DifferenceSegmenter().segment(img, out)
    truth = tools.change_map(img, out) > 12
    assert (mask & truth).sum() / truth.sum() > 0.85
    assert (mask & ~ndimage.binary_dilation(truth, iterations=3)).sum() == 0
    assert not tools.DifferenceSegmenter().segment(img, img.copy()).any()


def test_mask_gen_reports_an_empty_mask(toy):
    task = tools.Task(id="x", category="tile", anomaly_type="crack", image=normal(toy, "tile"), kind="texture")
    session = tools.Toolbox().session(task)
    session.images.append(task.image.copy())   # an "edit" that changed nothing
    session.sources.append("generated")
    result, images = session.call("mask_gen", {"anomaly_image": 2})
    assert result["empty"] and "no change" in result["message"] and not images[0].any()


def test_hostile_prompts_and_arguments_are_bounded(toy):
    """A policy can ask for anything: the tools answer fast, with an image or a tool error."""
    import time
    task = tools.Task(id="x", category="wood", anomaly_type="scratch", image=normal(toy, "wood"), kind="texture")
    session = tools.Toolbox().session(task)
    for prompt in ["a jagged crack about 100000000 pixels long", "a dark hole about 10000000 pixels across",
                   "a thick scratch 99999999999 px wide and 1e9 pixels long"]:
        start = time.time()
        session.call("image_gen", {"prompt": prompt, "target_image": 1})
        assert time.time() - start < 5
    for region in [[0, 0, float("inf"), 5], ["a", 1, 2, 3], [200, 200, 300, 300]]:
        with pytest.raises(tools.ToolError, match="region"):
            session.call("image_gen", {"prompt": "a dark stain", "target_image": 1, "region": region})


def test_judge_scores_are_finite_and_ignore_the_named_type(toy, kb):
    img = normal(toy, "wood")
    hairline = img.copy()
    hairline[np.arange(20, 60), np.arange(20, 60)] = 255
    r = judge(img, hairline, "texture", kb, "wood", "stain")
    assert np.isfinite([r["score"], r["location_score"], r["quality_score"]]).all()
    task = tools.Task(id="x", category="wood", anomaly_type="stain", image=img, kind="texture", dataset="toy")
    session = tools.Toolbox().session(task)
    session.call("image_gen", {"prompt": "a clearly visible dark round hole about 12 pixels across", "target_image": 1})
    as_stain, _ = session.call("quality_eval", {"anomaly_image": 2, "item_name": "wood", "anomaly_type": "stain"})
    as_hole, _ = session.call("quality_eval", {"anomaly_image": 2, "item_name": "wood", "anomaly_type": "hole"})
    assert as_hole["score"] == as_stain["score"]    # calling it a hole does not buy a hole's score


# ---- model servers: the OpenAI-compatible client, against a loopback server ---------------------

def test_model_server_retries_a_503_and_reports_a_401_without_the_key(monkeypatch):
    import threading
    import loopback_server
    server = loopback_server.serve()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TEST_KEY", "sk-secret-123")
        flaky = tools.ModelServer(server.url + "#flaky", api_key_env="TEST_KEY", retries=1, timeout=5)
        assert "A plausible crack" in flaky.chat([{"role": "user", "content": "hi"}])
        assert server.calls["flaky"] == 2   # the 503, then the retry
        assert server.log[-1][1] == "Bearer sk-secret-123"
        locked = tools.ModelServer(server.url + "#locked", api_key_env="TEST_KEY", retries=1, timeout=5)
        with pytest.raises(tools.ToolError, match="HTTP 401") as error:
            locked.chat([{"role": "user", "content": "hi"}])
        assert server.calls["locked"] == 1   # a 401 is not retried
        assert "sk-secret" not in str(error.value) + repr(flaky) + repr(locked)
    finally:
        server.shutdown()
    with pytest.raises(tools.UserError, match="openai:<base-url>#<model>"):
        tools.ModelServer("http://no-prefix")


def test_every_stage_calibrates_its_toolbox_unless_told_off(toy):
    import argparse
    parser = argparse.ArgumentParser()
    tools.add_backend_flags(parser)
    on = tools.make_toolbox(parser.parse_args([]), dataset=toy, categories=["bottle"])
    assert set(on.references) == {f"bottle/{t}" for t in toy.types("bottle")}
    off = tools.make_toolbox(parser.parse_args(["--references", "off"]), dataset=toy, categories=["bottle"])
    assert off.references == {}
