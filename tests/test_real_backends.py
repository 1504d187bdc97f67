"""The real-model backends, offline: tiny random diffusers pipelines built from config, a loopback
OpenAI-compatible server, and the tiny policy as a local vision-language judge."""
import argparse
import base64
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loopback_server
import rl
import synthesize
import tiny_diffusers
import tools
from conftest import ROOT
from loopback_server import VERDICT, WRITER_PROMPT

KEY = "sk-test-NEVER-WRITTEN-4242"


@pytest.fixture(scope="module")
def server():
    httpd = loopback_server.serve()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


def backend_args(**flags):
    parser = argparse.ArgumentParser()
    tools.add_backend_flags(parser)
    args = parser.parse_args([])
    args.__dict__.update(device="cpu", api_key_env="TEST_KEY", **flags)
    return args


def bottle_task(toy, anomaly_type="crack", i=0):
    return tools.Task(id="t", category="bottle", anomaly_type=anomaly_type, image=toy.load(toy.train_good["bottle"][i]),
                      kind="object", seed=7)


def play(box, task, *calls):
    """An episode driven by the given (tool, arguments) calls; returns it."""
    episode = tools.Episode(task, box)
    for name, arguments in calls:
        episode.step(tools.format_call("next", name, arguments))
    return episode


JUDGE = ("quality_eval", {"anomaly_image": 2, "item_name": "bottle", "anomaly_type": "crack"})
PAINT = ("image_gen", {"prompt": "a large dark jagged crack at the edge of the bottle rim", "target_image": 1})


def data_url_image(url):
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


# ---- diffusers editors -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: tiny_diffusers.build(kind, root / kind) for kind in ("inpaint", "instruct")}


def diffusers_box(folder, **flags):
    return tools.make_toolbox(backend_args(ig=f"diffusers:{folder}", ig_steps=2, ig_size=32, mg="edit-mask", **flags))


def test_a_served_judge_and_writer_and_a_diffusers_editor_through_synthesize(toy_root, pipelines, server, tmp_path):
    out = tmp_path / "synth"
    flags = ["--data-root", toy_root, "--categories", "bottle", "--types", "crack",
                        "--per-type", "1", "--max-turns", "6", "--out", out, "--api-key-env", "TEST_KEY",
                        "--qe", server.url + "#judge", "--pg", server.url + "#writer",
                        "--ig", f"diffusers:{pipelines['inpaint']}", "--ig-steps", "2", "--ig-size", "32",
                        "--mg", "edit-mask"]
    result = subprocess.run([sys.executable, ROOT / "synthesize.py", *map(str, flags)], cwd=ROOT, timeout=600,
                            capture_output=True, text=True, env={**os.environ, "TEST_KEY": KEY})
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "trajectories.jsonl").read_text().splitlines()[0])
    results = {t["tool"]: t["result"] for t in record["turns"] if t.get("result")}
    assert results["prompt_gen"]["prompt"] == WRITER_PROMPT
    judged = [t["result"] for t in record["turns"] if t["tool"] == "quality_eval"]
    assert judged and all(r["score"] == VERDICT["location_score"] + VERDICT["quality_score"]
                          and r["review"] == VERDICT["review"] for r in judged)
    assert record["final_score"] == 7.5 and record["mask_index"] is not None
    chats = [body for path, auth, body in server.log if path.endswith("/chat/completions")]
    judge, writer = ([b for b in chats if b["model"] == m] for m in ("judge", "writer"))
    images = [data_url_image(part["image_url"]["url"]) for part in judge[0]["messages"][0]["content"]
              if part["type"] == "image_url"]
    assert len(images) == 2 and all(im.shape == (128, 128, 3) for im in images)
    assert judge[0]["temperature"] == 0 and judge[0]["response_format"]["type"] == "json_schema"
    assert sum(part["type"] == "image_url" for part in writer[0]["messages"][0]["content"]) == 1
    assert all(auth == f"Bearer {KEY}" for _, auth, _ in server.log)
    # the key is nowhere: not in any file of the run, not in what it printed
    config = json.loads((out / "config.json").read_text())
    assert config["qe"] == server.url + "#judge" and config["ig"].startswith("diffusers:")
    assert KEY not in result.stdout + result.stderr
    for path in out.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


def test_inpainting_changes_only_the_allowed_region(toy, pipelines):
    box = diffusers_box(pipelines["inpaint"])
    assert box.editor.inpaints
    task = bottle_task(toy)
    # the expert's own episodes: the mask is the footprint of the prompt's words
    record = tools.run_episodes(tools.ExpertPolicy(seed=1), [task], box, max_turns=4)[0]
    generated = [record["images"][a["image_index"] - 1] for a in record["attempts"]]
    assert generated, record["turns"]
    for image in generated:
        allowed = box.editor.allowed_region(image)
        changed = np.abs(image.astype(int) - task.image.astype(int)).max(axis=2) > 0
        assert allowed is not None and 0 < allowed.mean() <= tools.MAX_EDIT_SHARE
        assert changed.any() and not (changed & ~allowed).any()   # max difference 0 outside
    # the agent's region is the mask
    episode = play(box, task, ("image_gen", {**PAINT[1], "region": [20, 30, 60, 70]}),
                   ("mask_gen", {"anomaly_image": 2}))
    edited, mask = episode.session.images[1], episode.session.images[2] > 0
    outside = np.ones(task.image.shape[:2], bool)
    outside[30:70, 20:60] = False
    assert np.abs(edited.astype(int) - task.image.astype(int))[outside].max() == 0
    assert not (mask & outside).any()   # edit-mask: only where the editor was allowed to paint


def test_an_instruction_editor_is_pasted_back_and_a_whole_image_edit_is_refused(toy, pipelines):
    box = diffusers_box(pipelines["instruct"])
    assert not box.editor.inpaints
    task = bottle_task(toy)
    record = tools.run_episodes(tools.ExpertPolicy(seed=1), [task], box, max_turns=2)[0]
    errors = [t["result"]["error"] for t in record["turns"] if t["tool"] == "image_gen"]
    assert errors and all("more than half" in e for e in errors)   # an observation, not a crash
    episode = play(box, task, ("image_gen", {**PAINT[1], "region": [10, 10, 50, 40]}))
    edited = episode.session.images[1]
    outside = np.ones(task.image.shape[:2], bool)
    outside[10:40, 10:50] = False
    assert np.abs(edited.astype(int) - task.image.astype(int))[outside].max() == 0
    assert (edited != task.image).any()


def test_a_bad_diffusers_folder_is_one_line(tmp_path):
    with pytest.raises(tools.UserError, match="cannot load a diffusers pipeline"):
        tools.make_toolbox(backend_args(ig=f"diffusers:{tmp_path / 'nothing'}"))
    with pytest.raises(tools.UserError, match="--ig paint:me"):
        tools.make_toolbox(backend_args(ig="paint:me"))


# ---- served judges, writers and editors -----------------------------------------------------------

def test_judge_replies_are_parsed_tolerantly_and_failures_are_observations(toy, server, monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    task = bottle_task(toy)
    for model in ("flaky", "strict"):   # a 503 is retried; a server without response_format is asked again
        episode = play(tools.make_toolbox(backend_args(qe=f"{server.url}#{model}")), task, PAINT, JUDGE)
        assert episode.turns[-1]["result"]["score"] == 7.5, episode.turns[-1]
    assert server.calls["flaky"] == 2 and server.calls["strict"] == 2
    # garbage: asked twice, then an error observation the runner marks as a backend error
    episode = play(tools.make_toolbox(backend_args(qe=f"{server.url}#garbage")), task, PAINT, JUDGE)
    assert "no JSON object" in episode.turns[-1]["result"]["error"] and episode.turns[-1]["backend_error"]
    assert server.calls["garbage"] == 2 and rl.judge_failed(episode.record())
    episode = play(tools.make_toolbox(backend_args(qe=f"{server.url}#locked")), task, PAINT, JUDGE)
    error = episode.turns[-1]["result"]["error"]
    assert "HTTP 401" in error and KEY not in error + repr(episode.session.box.judge.chat.server)
    # a thinking-free reply with two objects: the one with the keys
    assert tools.parse_json_reply('x {"a": 1} ```json\n{"a": 2, "b": 3}\n```', ["a", "b"]) == {"a": 2, "b": 3}


def test_five_backend_errors_in_a_row_stop_a_run(toy_root, server, tmp_path, monkeypatch):
    with pytest.raises(tools.BackendDown, match=r"quality_eval: 5 backend errors in a row.*#garbage"):
        synthesize.main(["--data-root", str(toy_root), "--categories", "bottle", "--types", "crack",
                         "--per-type", "6", "--out", str(tmp_path / "s"), "--qe", server.url + "#garbage"])
    assert not (tmp_path / "s" / "summary.json").exists()


def test_a_served_image_editor_is_pasted_back(toy, server, monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    box = tools.make_toolbox(backend_args(ig=f"{server.url}#imager", mg="edit-mask"))
    task = bottle_task(toy)
    episode = play(box, task, PAINT, ("mask_gen", {"anomaly_image": 2}))
    edited, mask = episode.session.images[1], episode.session.images[2] > 0
    changed = np.abs(edited.astype(int) - task.image.astype(int)).max(axis=2) > 0
    assert changed[40:56, 40:56].mean() > 0.5 and not changed[:30].any()   # the faint drift is not pasted
    assert mask[44:52, 44:52].all() and not mask[:30].any()
    _, auth, form = server.log[-1]
    assert form["model"] == b"imager" and form["n"] == b"1" and form["response_format"] == b"b64_json"
    assert form["prompt"].decode() == PAINT[1]["prompt"] and auth == f"Bearer {KEY}"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(form["image"]))), task.image)


def test_judge_scores_are_clamped(toy, monkeypatch):
    class Chat:
        name = "stub"

        def ask(self, images, text, schema, temperature=None):
            return '{"location_score": 9, "quality_score": -2, "review": "odd"}'
    result = tools.ModelJudge(Chat()).evaluate(toy.load(toy.train_good["bottle"][0]), toy.load(toy.train_good["bottle"][1]),
                                               "object", tools.KnowledgeBase().lookup("bottle", "crack", "toy"))
    assert (result["location_score"], result["quality_score"], result["score"]) == (5.0, 0.0, 5.0)


def test_rl_leaves_a_failed_judgement_out_of_its_group():
    advantages, keep = rl.grpo_advantages([1.0, 3.0, 0.0, 2.0, 2.0, 5.0], 3, judged=[True, True, False, True, True, True])
    assert keep.tolist() == [True, True, False, True, True, True]
    assert advantages[2] == 0 and abs(advantages[0] + 1) < 1e-4 and abs(advantages[1] - 1) < 1e-4


# ---- a local vision-language model as judge ------------------------------------------------------

def test_a_local_vlm_judge_is_wired_end_to_end(toy, tmp_path):
    tools.tiny_policy([tools.SYSTEM_PROMPT, json.dumps(VERDICT)] * 4, seed=0).save(tmp_path / "vlm")
    box = tools.make_toolbox(backend_args(qe=f"vlm:{tmp_path / 'vlm'}", vlm_max_new_tokens=4))
    task = bottle_task(toy)
    episode = play(box, task, PAINT, JUDGE)   # a random model's reply: an error observation
    assert episode.turns[-1]["backend_error"] and "vlm:" in episode.turns[-1]["result"]["error"]
    seen = []

    def act(conversations):
        seen.append(conversations)
        return ['<think>Looks fine.</think> {"location_score": 2, "quality_score": 3, "review": "ok"}']
    box.judge.chat.model.act = act
    episode = play(box, task, PAINT, JUDGE)
    assert episode.turns[-1]["result"]["score"] == 5.0
    content = seen[0][0][0]["content"]
    assert [part["type"] for part in content] == ["image", "image", "text"]
    assert np.array_equal(content[0]["image"], task.image)
