"""synthesize.py end to end, as a user runs it (subprocesses), plus its acceptance measurements."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import tools
from conftest import ROOT, run_script, run_torchrun


def records(out):
    return [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def default_run(toy_root, tmp_path_factory):
    """`python synthesize.py` with its defaults (on the session's toy world)."""
    out = tmp_path_factory.mktemp("synth") / "out"
    result = run_script("synthesize.py", "--data-root", toy_root, "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_default_run_covers_every_eval_type_with_complete_trajectories(default_run, toy):
    out, result = default_run
    rs = records(out)
    assert "episodes | completed (answer after mask) 100%" in result.stdout
    for cat in toy.eval_categories:
        for t in toy.types(cat):
            mine = [r for r in rs if (r["category"], r["anomaly_type"]) == (cat, t)]
            assert len(mine) == 5
            for i in range(5):
                assert (out / cat / t / "image" / f"{i:03d}.png").is_file()
                assert (out / cat / t / "mask" / f"{i:03d}.png").is_file()
    for r in rs:
        calls = r["tool_calls"]
        assert calls[:3] == ["prompt_gen", "image_gen", "quality_eval"] and calls[-2:] == ["mask_gen", "answer"]
        assert r["format_valid"] and r["stop_reason"] == "answer"
        # the stored format: image placeholders, and the files (beside the log) in their order
        placeholders = [p for m in r["messages"] for p in m["content"] if p["type"] == "image"]
        assert placeholders == [{"type": "image"}] * len(r["images"])
        assert all((out / path).is_file() for path in r["images"])


def test_masks_are_nonempty_and_nothing_outside_them_changed(default_run, toy):
    out, _ = default_run
    for r in records(out):
        normal = tools.load_image(out / r["step_images"][0])
        image = tools.load_image(out / r["final_image"])
        mask = tools.load_mask(out / r["mask"])
        assert mask.any(), r["id"]
        outside = ~ndimage.binary_dilation(mask, iterations=3)
        # mean absolute change below 1/255 of the range, i.e. one grey level
        assert np.abs(image.astype(float) - normal)[outside].mean() < 1.0, r["id"]
        assert np.array_equal(normal, toy.load(r["normal_image"]))


def test_the_agent_refines_and_refinement_pays(default_run):
    out, _ = default_run
    rs = records(out)
    refined = [r for r in rs if len(r["attempts"]) >= 2]
    assert len(refined) >= 0.2 * len(rs)
    assert all(r["final_score"] > r["qe_scores"][0] for r in refined)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == len(rs) and summary["multi_attempt"] == len(refined) / len(rs)


def test_samples_of_a_type_differ_in_place_shape_and_size(default_run, toy):
    out, _ = default_run
    for cat in toy.eval_categories:
        for t in toy.types(cat):
            masks = [tools.load_mask(p) for p in sorted((out / cat / t / "mask").glob("*.png"))]
            images = [tools.load_image(p) for p in sorted((out / cat / t / "image").glob("*.png"))]
            for i, j in itertools.combinations(range(len(masks)), 2):
                overlap = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
                assert overlap < 0.5, (cat, t, i, j)            # different places and shapes
                assert not np.array_equal(images[i], images[j])
            areas = [m.sum() for m in masks]
            assert max(areas) > 1.3 * min(areas), (cat, t)     # different sizes


def test_gallery_shows_every_sample(default_run):
    out, _ = default_run
    page = (out / "index.html").read_text()
    for r in records(out):
        assert r["id"] in page and r["final_image"] in page and r["mask"] in page


def test_rerun_resumes_and_keeps_finished_samples(toy_root, tmp_path):
    out = tmp_path / "out"
    args = ["--data-root", toy_root, "--out", out, "--categories", "washer", "--per-type", "2"]
    assert run_script("synthesize.py", *args).returncode == 0
    first = (out / "trajectories.jsonl").read_text().splitlines()
    stamp = (out / "washer" / "crack" / "image" / "000.png").stat().st_mtime_ns
    # a run killed while writing leaves a cut line: that sample is redone, the others are kept
    (out / "trajectories.jsonl").write_text("\n".join(first[:-1]) + "\n" + first[-1][:50])
    result = run_script("synthesize.py", *args)
    assert result.returncode == 0 and "5 already in" in result.stdout
    again = (out / "trajectories.jsonl").read_text().splitlines()
    assert sorted(again) == sorted(first)       # the redone sample is identical (deterministic)
    assert (out / "washer" / "crack" / "image" / "000.png").stat().st_mtime_ns == stamp
    # more samples per type extend the run
    result = run_script("synthesize.py", *args[:-1], "3")
    assert result.returncode == 0 and len(records(out)) == 9


def test_torchrun_makes_the_samples_of_one_process_and_resumes(toy_root, tmp_path):
    """Two ranks share the samples out; rank 0 merges their files into one trajectories.jsonl and
    writes one gallery. Rerun, the same command finishes what a killed run left."""
    args = ["--data-root", toy_root, "--categories", "washer", "--per-type", "2"]
    one = run_script("synthesize.py", *args, "--out", tmp_path / "one")
    two = run_torchrun("synthesize.py", 2, *args, "--out", tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    expected = sorted((tmp_path / "one" / "trajectories.jsonl").read_text().splitlines())
    lines = (tmp_path / "two" / "trajectories.jsonl").read_text().splitlines()
    assert sorted(lines) == expected and len(lines) == 6   # the same ids, the very same samples
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    page = (tmp_path / "two" / "index.html").read_text()
    assert all(r["id"] in page for r in records(tmp_path / "two"))
    # what a kill leaves: the merged file of an earlier run, each rank's own file, a line cut short
    kept = json.loads(lines[0])
    stamp = (tmp_path / "two" / kept["final_image"]).stat().st_mtime_ns
    (tmp_path / "two" / "trajectories.jsonl").write_text(lines[0] + "\n")
    (tmp_path / "two" / "trajectories.rank0.jsonl").write_text(lines[1] + "\n" + lines[2][:40])
    (tmp_path / "two" / "trajectories.rank1.jsonl").write_text(lines[3] + "\n")
    again = run_torchrun("synthesize.py", 2, *args, "--out", tmp_path / "two")
    assert again.returncode == 0, again.stderr
    assert "6 samples on toy (3 already in" in again.stdout
    assert sorted((tmp_path / "two" / "trajectories.jsonl").read_text().splitlines()) == expected
    assert (tmp_path / "two" / kept["final_image"]).stat().st_mtime_ns == stamp
    assert not list((tmp_path / "two").glob("trajectories.rank*"))


def test_seeds_and_tool_ablations(toy_root, tmp_path):
    base = ["--data-root", toy_root, "--categories", "bottle", "--per-type", "2"]
    a = run_script("synthesize.py", *base, "--out", tmp_path / "a")
    b = run_script("synthesize.py", *base, "--out", tmp_path / "b", "--seed", "1")
    no_kr = run_script("synthesize.py", *base, "--out", tmp_path / "c", "--tools", "PG,IG,QE,MG")
    assert a.returncode == b.returncode == no_kr.returncode == 0
    prompts = lambda out: [a["prompt"] for r in records(out) for a in r["attempts"]]
    assert prompts(tmp_path / "a") != prompts(tmp_path / "b")
    finals = lambda out: [tools.load_image(out / r["final_image"]) for r in records(out)]
    assert not all(np.array_equal(x, y) for x, y in zip(finals(tmp_path / "a"), finals(tmp_path / "b")))
    assert all("knowledge_retrieval" not in r["tool_calls"] for r in records(tmp_path / "c"))
    bare = run_script("synthesize.py", *base, "--out", tmp_path / "d", "--tools", "IG")
    assert bare.returncode == 0
    for r in records(tmp_path / "d"):
        assert r["tool_calls"] == ["image_gen", "answer"] and (tmp_path / "d" / r["mask"]).is_file()


@pytest.mark.parametrize("args, message", [
    (["--data", "mvtec"], "needs --data-root"),
    (["--data", "mvtec", "--data-root", "/nonexistent/mvtec"], "does not exist"),
    (["--categories", "spaceship"], "unknown category 'spaceship'"),
    (["--tools", "PG,XX"], "unknown tool 'XX'"),
    (["--data", "cifar"], "--data must be toy, mvtec, visa or images"),
    (["--categories", ""], "--categories is empty"),
    (["--per-type", "0"], "--per-type must be at least 1"),
    (["--size", "16"], "--size must be at least 32"),
    (["--policy", "tests"], "is not a model"),
    (["--method", "gan"], "--method must be one of agent, fixed-prompt, draem, cutpaste"),
    (["--method", "draem", "--policy", "runs/sft"], "--policy is for --method agent"),
])
def test_bad_input_is_one_line(args, message, toy_root, tmp_path):
    root = [] if "--data" in args else ["--data-root", toy_root]
    result = run_script("synthesize.py", *root, "--out", tmp_path / "o", *args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unwritable_or_foreign_output_and_corrupt_images(toy_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_script("synthesize.py", "--data-root", toy_root, "--out", blocker / "out")
    assert result.returncode != 0 and "cannot write to --out" in result.stderr
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    result = run_script("synthesize.py", "--data-root", toy_root, "--out", tmp_path / "foreign")
    assert "is not a synthesize.py output" in result.stderr
    # a run with other settings is never overwritten
    args = ["--data-root", toy_root, "--categories", "washer", "--per-type", "1"]
    assert run_script("synthesize.py", *args, "--out", tmp_path / "o").returncode == 0
    result = run_script("synthesize.py", *args, "--out", tmp_path / "o", "--seed", "9")
    assert result.returncode != 0 and "--seed 0 -> 9" in result.stderr
    # a write that fails mid-run is one line naming the file, and the finished samples stay
    (tmp_path / "o" / "washer" / "crack" / "steps" / "000").rename(tmp_path / "steps")
    (tmp_path / "o" / "washer" / "crack" / "steps").rmdir()
    (tmp_path / "o" / "washer" / "crack" / "steps").write_text("in the way")
    finished = records(tmp_path / "o")
    result = run_script("synthesize.py", *args[:-1], "2", "--out", tmp_path / "o")
    last = result.stderr.strip().splitlines()[-1]    # after the progress bar
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last.startswith("error: cannot write") and last.endswith("crack/steps/001/1.png: Not a directory")
    assert records(tmp_path / "o") == finished
    # the settings are saved only once the generator has loaded: a mistyped --policy locks nothing
    result = run_script("synthesize.py", *args, "--out", tmp_path / "q", "--policy", "tests")
    assert "is not a model" in result.stderr and not (tmp_path / "q" / "config.json").exists()
    # a corrupt normal image is named
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(toy_root, broken)
    for p in (broken / "washer" / "train" / "good").glob("*.png"):
        p.write_bytes(b"garbage")
    result = run_script("synthesize.py", "--data-root", broken, "--categories", "washer",
                        "--per-type", "1", "--out", tmp_path / "p")
    assert result.returncode != 0 and "cannot read image" in result.stderr and ".png" in result.stderr


def test_repeated_categories_and_spaces_in_lists(toy_root, tmp_path):
    result = run_script("synthesize.py", "--data-root", toy_root, "--out", tmp_path / "o",
                        "--categories", "washer, washer", "--types", "crack, missing", "--per-type", "1")
    assert result.returncode == 0, result.stderr
    assert sorted(r["id"] for r in records(tmp_path / "o")) == ["washer/crack/000", "washer/missing/000"]


# ---- the baselines (--method) ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fixed-prompt", "draem", "cutpaste"])
def test_baselines_write_the_same_layout_and_resume(method, toy_root, toy, tmp_path):
    args = ["--data-root", toy_root, "--categories", "washer", "--per-type", "2", "--method", method]
    result = run_script("synthesize.py", *args, "--out", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    assert f"6 samples ({method}) | made 100%" in result.stdout
    rs = records(tmp_path / "a")
    assert sorted(r["id"] for r in rs) == [f"washer/{t}/{i:03d}" for t in toy.types("washer") for i in range(2)]
    for r in rs:
        out = tmp_path / "a"
        normal, image = toy.load(r["normal_image"]), tools.load_image(out / r["final_image"])
        mask = tools.load_mask(out / r["mask"])
        assert r["final_image"] == f"{r['id'].rsplit('/', 1)[0]}/image/{r['id'][-3:]}.png"
        assert r["method"] == method and r["messages"] == [] and 0 <= r["final_score"] <= 10
        assert np.array_equal(tools.load_image(out / r["step_images"][0]), normal)
        if method == "fixed-prompt":   # the mask is the mask tool's; the prompt names only type and item
            assert r["prompt"] == tools.local_edit_prompt(r["anomaly_type"], "the washer")
            assert np.array_equal(mask, tools.DifferenceSegmenter().segment(normal, image))
        else:                          # the edit is confined to its mask, which is never empty
            assert mask.any() and np.array_equal(image[~mask], normal[~mask])
            assert not np.array_equal(image[mask], normal[mask])
    assert (tmp_path / "a" / "index.html").is_file() and (tmp_path / "a" / "overview.png").is_file()
    # deterministic, and a rerun resumes
    again = run_script("synthesize.py", *args, "--out", tmp_path / "b")
    assert again.returncode == 0
    assert (tmp_path / "a" / "trajectories.jsonl").read_text() == (tmp_path / "b" / "trajectories.jsonl").read_text()
    resumed = run_script("synthesize.py", *args, "--out", tmp_path / "a")
    assert resumed.returncode == 0 and "6 already in" in resumed.stdout


def test_the_method_is_part_of_the_run_settings(toy_root, tmp_path):
    args = ["--data-root", toy_root, "--categories", "washer", "--per-type", "1", "--out", tmp_path / "o"]
    assert run_script("synthesize.py", *args).returncode == 0
    result = run_script("synthesize.py", *args, "--method", "cutpaste")
    assert result.returncode != 0 and "--method agent -> cutpaste" in result.stderr
    # a run made before --method existed is the agent's, and still resumes
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    del config["method"]
    (tmp_path / "o" / "config.json").write_text(json.dumps(config))
    result = run_script("synthesize.py", *args)
    assert result.returncode == 0 and "3 already in" in result.stdout


def test_cutpaste_pastes_a_patch_of_the_image_and_draem_a_texture(toy):
    import synthesize
    task = tools.make_task(toy, tools.plan_tasks(toy, "wood", None, 1)[0])
    image, mask, _ = synthesize.cutpaste(task, tools.Toolbox(), np.random.default_rng(0))
    ys, xs = np.nonzero(mask)
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert mask.sum() == h * w and 0.02 * 128 ** 2 * 0.9 <= h * w <= 0.15 * 128 ** 2 * 1.1   # one rectangle
    # the jitter maps grey levels affinely (a hue turn keeps them), so the pasted patch's grey
    # levels correlate perfectly with one same-sized window of the original image, and with few others
    grey = lambda a: (a - a.mean()) / (a.std() + 1e-9)
    patch = grey(image[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(float).mean(axis=2))
    source = task.image.astype(float).mean(axis=2)
    corr = np.array([(patch * grey(source[y:y + h, x:x + w])).mean() for y in range(129 - h) for x in range(129 - w)])
    assert corr.max() > 0.98 and np.mean(corr > 0.9) < 0.01
    image, mask, notes = synthesize.draem(task, tools.Toolbox(), np.random.default_rng(1))
    assert 0 <= notes["beta"] <= 0.8 and mask.any() and np.array_equal(image[~mask], task.image[~mask])
    noise = synthesize.perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert -1.01 <= noise.min() < 0 < noise.max() <= 1.01 and abs(noise[0, 0]) < 1e-9   # zero on the lattice


def test_mvtec_layout_is_a_dataset_the_project_reads_back(toy_root, toy, tmp_path):
    """--layout mvtec writes train/good, test/<type>, ground_truth/<type>/<i>_mask.png (0/255), and
    `--data mvtec` on that folder synthesizes again."""
    out = tmp_path / "as-mvtec"
    result = run_script("synthesize.py", "--data-root", toy_root, "--categories", "bottle", "--per-type", 2,
                        "--layout", "mvtec", "--out", out)
    assert result.returncode == 0, result.stderr
    rs = records(out)
    assert len(rs) == 2 * len(toy.types("bottle"))
    for r in rs:
        cat, t, i = r["id"].split("/")
        image = tools.load_image(out / cat / "test" / t / f"{i}.png")
        assert np.array_equal(image, tools.load_image(out / r["final_image"]))
        mask = np.asarray(Image.open(out / cat / "ground_truth" / t / f"{i}_mask.png"))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
        normal = tools.load_image(out / cat / "train" / "good" / f"{Path(r['normal_image']).stem}.png")
        assert np.array_equal(normal, toy.load(r["normal_image"]))
    assert not (out / "bottle" / rs[0]["anomaly_type"] / "image").exists()
    again = run_script("synthesize.py", "--data", "mvtec", "--data-root", out, "--per-type", 1,
                       "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    # the types on disk, and those the knowledge base knows for an MVTec-AD bottle
    again_types = {r["anomaly_type"] for r in records(tmp_path / "again")}
    assert again_types == set(tools.load_dataset("mvtec", out).synthesis_types("bottle")) >= set(toy.types("bottle"))


# ---- a served policy: --policy openai:<base-url>#<model> ----------------------------------------

def from_chat_messages(chat):
    """OpenAI chat messages back into the runner's conversation (images decoded from data URLs)."""
    import base64
    import io
    messages = []
    for m in chat:
        if isinstance(m["content"], str):
            messages.append(m)
            continue
        parts = []
        for p in m["content"]:
            if p["type"] == "image_url":
                data = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                parts.append({"type": "image", "image": np.asarray(Image.open(io.BytesIO(data)))})
            else:
                parts.append(p)
        messages.append({**m, "content": parts})
    return messages


@pytest.fixture
def expert_server():
    """A loopback OpenAI-compatible server whose replies are the expert policy's (seed 0); it fails
    the requests whose conversation names a "fail_on" item, as a server in trouble would."""
    import http.server
    import threading
    expert, seen = tools.ExpertPolicy(seed=0), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            messages = from_chat_messages(body["messages"])
            if "Item: nut." in tools.message_text(messages[1]) and len(messages) > 4:
                self.send_response(400)   # not retried: the runner must cope with the failed turn
                self.end_headers()
                return
            reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                         "content": expert.next_turn(messages)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"openai:http://127.0.0.1:{server.server_address[1]}/v1#expert", seen
    server.shutdown()


def test_a_served_policy_plays_the_same_episodes_as_the_local_one(expert_server, toy_root, tmp_path):
    spec, seen = expert_server
    common = ["--data-root", toy_root, "--categories", "washer", "--per-type", 2, "--batch-size", 4]
    local = run_script("synthesize.py", *common, "--out", tmp_path / "local")
    served = run_script("synthesize.py", *common, "--policy", spec, "--out", tmp_path / "served")
    assert local.returncode == 0 and served.returncode == 0, served.stderr
    assert records(tmp_path / "served") == records(tmp_path / "local")
    for r in records(tmp_path / "local"):
        for path in r["images"]:
            assert np.array_equal(tools.load_image(tmp_path / "served" / path), tools.load_image(tmp_path / "local" / path))
    # the images went as data URLs, in place, and every turn of every episode was one request
    first = seen[0]["messages"][1]["content"]
    assert first[0]["type"] == "image_url" and first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert len(seen) == sum(r["num_turns"] for r in records(tmp_path / "served"))


def test_a_failing_server_ends_the_episode_not_the_run(expert_server, toy_root, tmp_path):
    spec, _ = expert_server
    result = run_script("synthesize.py", "--data-root", toy_root, "--categories", "nut", "--types", "crack",
                        "--per-type", 2, "--policy", spec, "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    for r in records(tmp_path / "o"):
        assert r["stop_reason"] == "no_action" and r["turns"][-1]["action"] == "none"
        assert r["num_turns"] == 3 and r["final_image"] is None   # the third request failed


def photo(path, seed, side=64):
    """A stand-in for a user's photo: a lit grey disc on a dark background, with sensor noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    disc = np.hypot(yy - side / 2 - rng.uniform(-3, 3), xx - side / 2) < side / 3
    image = np.where(disc[..., None], 170 - 0.6 * yy[..., None], 30) + rng.normal(0, 2, (side, side, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)


def test_own_photos_in_a_plain_folder_any_known_or_named_type(tmp_path):
    for i in range(2):
        photo(tmp_path / "photos" / f"IMG_{i}.png", i)
    result = run_script("synthesize.py", "--data", "images", "--data-root", tmp_path / "photos",
                        "--categories", "screw", "--types", "scratch_head,melted_goo", "--per-type", "1",
                        "--size", "64", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "knowledge retrieval has nothing for 'melted_goo'" in result.stdout
    assert "stand-ins" in result.stdout.splitlines()[0]   # the offline backends say what they are
    rs = records(tmp_path / "o")
    assert sorted(r["anomaly_type"] for r in rs) == ["melted_goo", "scratch_head"]
    assert all((tmp_path / "o" / r["final_image"]).is_file() for r in rs)


def test_the_expert_and_the_offline_tools_never_import_torch(toy_root, tmp_path):
    """synthesize.py with the expert and build_trajectories.py run without importing torch (about
    2 s of every start): tools.py imports it when a model is first used."""
    for script, args in (("synthesize.py", ["--per-type", 1, "--categories", "washer", "--out", tmp_path / "s"]),
                         ("build_trajectories.py", ["--limit", 4, "--categories", "washer", "--out", tmp_path / "t"])):
        code = (f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv = {[script, '--data-root', str(toy_root), *map(str, args)]!r}\n"
                f"try: runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
                "finally: print('torch imported:', 'torch' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "torch imported: False" in result.stdout, script
