"""The agent protocol: the turn parser, the episode runner's error handling, the expert policy."""
import json

import numpy as np
import pytest

import tools


def call(name, **arguments):
    return tools.format_call("reason", name, arguments)


# ---- parser ------------------------------------------------------------------------------------

def test_parser_reads_a_call_and_tolerates_whitespace():
    text = '\n  <thinking> look first </thinking>\n\n <tool_call>\n {"name": "prompt_gen", ' \
           '"arguments": {"image": 1}} \n</tool_call>  \n'
    turn = tools.parse_turn(text)
    assert turn.action == "call" and turn.well_formed
    assert turn.thinking == "look first"
    assert turn.call == {"name": "prompt_gen", "arguments": {"image": 1}}


def test_parser_reads_an_answer():
    turn = tools.parse_turn('<thinking>done</thinking><answer>{"status": "success", '
                            '"final_image_index": 3, "mask_generated": true}</answer>')
    assert turn.action == "answer" and turn.well_formed and turn.answer["final_image_index"] == 3


@pytest.mark.parametrize("text, action, fragment", [
    ('<thinking>x</thinking><tool_call>{"name": "image_gen", "arguments": {prompt: 1}}</tool_call>',
     "malformed", "not valid JSON"),
    ("<thinking>x</thinking><tool_call>{'name': 'image_gen', 'arguments': {}}</tool_call>",
     "malformed", "not valid JSON"),
    ('<thinking>x</thinking><tool_call>{"name": "a", "arguments": {}}</tool_call>'
     '<tool_call>{"name": "b", "arguments": {}}</tool_call>', "malformed", "one tool call"),
    ('<thinking>x</thinking><tool_call>{"name": "image_gen"}</tool_call>', "malformed", "arguments"),
    ('<thinking>x</thinking><answer>{"final_image_index": "2"}</answer>', "malformed", "integer"),
    ("<thinking>I am not sure what to do</thinking>", "none", "no <tool_call>"),
    ("plain text", "none", "exactly one <thinking>"),
    ("<thinking>x</thinking><tool_call>" + "[" * 5000 + "</tool_call>", "malformed", "not valid JSON"),
    ('<thinking>x</thinking><answer>{"final_image_index": true}</answer>', "malformed", "integer"),
    ('<thinking>x</thinking><answer>{"final_image_index": 2.0}</answer>', "malformed", "integer"),
    ("<thinking>" * 10_000, "malformed", "characters long"),
])
def test_parser_rejects_malformed_turns(text, action, fragment):
    turn = tools.parse_turn(text)
    assert turn.action == action and not turn.well_formed
    assert fragment in turn.error


def test_parser_flags_missing_thinking_and_stray_text_but_keeps_the_call():
    for text in ['<tool_call>{"name": "mask_gen", "arguments": {"anomaly_image": 2}}</tool_call>',
                 '<thinking>x</thinking> ok then <tool_call>{"name": "mask_gen", "arguments": {}}</tool_call>']:
        turn = tools.parse_turn(text)
        assert turn.action == "call" and not turn.well_formed


# ---- runner ------------------------------------------------------------------------------------

class Scripted:
    """A policy that replays fixed replies, one per turn."""
    def __init__(self, replies):
        self.replies = list(replies)

    def act(self, conversations):
        return [self.replies.pop(0) for _ in conversations]


@pytest.fixture(scope="module")
def task(toy):
    path = toy.train_good["nut"][0]
    return tools.Task(id="nut/scratch/000", category="nut", anomaly_type="scratch",
                      image=toy.load(path), kind="object", dataset="toy", seed=1, image_path=str(path))


def play(task, replies, max_turns=10, enabled=None):
    box = tools.Toolbox(enabled or list(tools.TOOL_NAMES.values()))
    return tools.run_episodes(Scripted(replies), [task], box, max_turns)[0]


def test_runner_answers_bad_calls_with_error_observations(task):
    record = play(task, [
        '<thinking>x</thinking><tool_call>{"name": "image_gen", "arguments": {"prompt": }}</tool_call>',
        call("paint_it", prompt="x"),
        call("image_gen", target_image=1),
        call("image_gen", prompt="make it nicer", target_image=1),
        call("quality_eval", anomaly_image=1, item_name="nut", anomaly_type="scratch"),
        "<thinking>no idea</thinking>",
    ])
    errors = [json.loads(tools.message_text(m))["error"] for m in record["messages"] if m["role"] == "tool"]
    assert "not valid JSON" in errors[0]
    assert "unknown tool 'paint_it'" in errors[1]
    assert "missing the argument(s) prompt" in errors[2]
    assert "names no defect" in errors[3]
    assert "not a generated anomaly" in errors[4]
    assert [t["format_ok"] for t in record["turns"]] == [False, False, False, True, True, False]
    assert record["stop_reason"] == "no_action" and record["final_image_index"] is None
    assert not record["format_valid"]


def test_no_reply_crashes_an_episode_or_counts_as_well_formed(task):
    """Replies a broken or hostile model might write: every episode ends with an error
    observation for its turn, none raises, and none of these turns counts as well formed."""
    think = "<thinking>x</thinking>"
    replies = {
        "nested call": think + "<tool_call>" + "[" * 3000 + "</tool_call>",
        "nested answer": think + '<answer>{"final_image_index": ' + "[" * 3000 + "</answer>",
        "nested arguments": think + '<tool_call>{"name": "mask_gen", "arguments": {"anomaly_image": '
                            + "[" * 3000 + "]" * 3000 + "}}</tool_call>",
        "list as item": call("prompt_gen", image=1, item_name=["nut"], anomaly_type="scratch"),
        "number as prompt": call("image_gen", prompt=7, target_image=1),
        "object as type": call("knowledge_retrieval", item_name="nut", anomaly_type={"kind": "scratch"}),
        "string as index": call("image_gen", prompt="a dark hole", target_image="1"),
        "float as index": call("mask_gen", anomaly_image=2.7),
        "whole float as index": call("image_gen", prompt="a dark hole", target_image=1.0),
        "boolean as index": call("quality_eval", anomaly_image=True, item_name="nut", anomaly_type="scratch"),
        "null as index": call("prompt_gen", image=None, item_name="nut", anomaly_type="scratch"),
        "words in region": call("image_gen", prompt="a dark hole", target_image=1, region=[0, "top", 5, 5]),
        "boolean answer": tools.format_answer("done", {"status": "success", "final_image_index": True}),
        "100,000 characters": think + "x" * 100_000,
        "100,000 characters of tags": "<tool_call>" * 9_091,
    }
    records = tools.run_episodes(Scripted(replies.values()), [task] * len(replies), tools.Toolbox(), max_turns=1)
    for (case, reply), record in zip(replies.items(), records):
        observation = record["messages"][-1]
        assert observation["role"] == "tool", case
        error = json.loads(tools.message_text(observation))["error"]
        assert record["turns"][0]["format_ok"] is False and record["turns"][0]["error"] == error, case
        assert "failed" not in error, (case, error)          # no backend crashed on the arguments
    errors = {case: r["turns"][0]["error"] for case, r in zip(replies, records)}
    assert "maximum recursion depth" in errors["nested call"]
    assert errors["list as item"] == "prompt_gen: item_name must be a string, not a list"
    assert errors["float as index"] == "mask_gen: anomaly_image must be an integer, not 2.7"
    assert errors["boolean as index"] == "quality_eval: anomaly_image must be an integer, not true"
    assert "region must be a list of numbers" in errors["words in region"]
    assert "characters long" in errors["100,000 characters"]


def test_runner_survives_a_backend_crash(task, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("GPU on fire")
    box = tools.Toolbox()
    monkeypatch.setattr(box.editor, "edit", boom)
    record = tools.run_episodes(Scripted([call("image_gen", prompt="a thin scratch", target_image=1)]),
                                [task], box, max_turns=1)[0]
    assert "GPU on fire" in json.loads(tools.message_text(record["messages"][-1]))["error"]
    assert record["stop_reason"] == "max_turns"


def test_runner_stops_at_max_turns_and_rejects_switched_off_tools(task):
    record = play(task, [call("knowledge_retrieval", item_name="nut", anomaly_type="scratch")] * 3,
                  max_turns=2, enabled=["prompt_gen", "image_gen", "quality_eval", "mask_gen"])
    assert record["num_turns"] == 2 and record["stop_reason"] == "max_turns"
    assert "switched off" in tools.message_text(record["messages"][3])
    assert "knowledge_retrieval" not in record["messages"][0]["content"]


def test_answer_must_name_a_generated_image(task):
    record = play(task, [tools.format_answer("done", {"status": "success", "final_image_index": 1})])
    assert record["stop_reason"] == "answer" and record["final_image_index"] is None
    assert record["turns"][0]["format_ok"] is False


def test_generated_images_are_attached_and_numbered(task):
    record = play(task, [call("image_gen", prompt="a bright thin scratch line about 40 pixels long",
                              target_image=1),
                         call("mask_gen", anomaly_image=2),
                         tools.format_answer("done", {"status": "success", "final_image_index": 2})])
    obs = [m for m in record["messages"] if m["role"] == "tool"]
    assert json.loads(tools.message_text(obs[0]))["image_index"] == 2
    assert [p["type"] for p in obs[0]["content"]] == ["text", "image"]
    assert obs[0]["content"][1]["image"] is record["images"][1]
    assert json.loads(tools.message_text(obs[1]))["mask_index"] == 3
    assert record["final_image_index"] == 2 and record["mask_index"] == 3


# ---- expert ------------------------------------------------------------------------------------

CANONICAL = ["prompt_gen", "image_gen", "quality_eval"]


def check_order(calls, pass_score, scores):
    """PG -> IG -> QE [-> KR] [-> IG -> QE]... -> MG -> answer."""
    assert calls[:3] == CANONICAL and calls[-2:] == ["mask_gen", "answer"]
    middle = calls[3:-2]
    while middle:
        if middle[0] == "knowledge_retrieval":
            middle = middle[1:]
        assert middle[:2] == ["image_gen", "quality_eval"]
        middle = middle[2:]
    assert all(s < pass_score for s in scores[:-1])


def test_expert_follows_the_canonical_order_and_refines(toy):
    box = tools.Toolbox()
    tasks = [tools.Task(id=f"{c}/{t}/{i}", category=c, anomaly_type=t,
                        image=toy.load(toy.train_good[c][i]), kind=toy.kinds[c], seed=100 + i)
             for c in toy.eval_categories for t in toy.types(c) for i in range(3)]
    records = tools.run_episodes(tools.ExpertPolicy(seed=0), tasks, box, max_turns=10)
    for r in records:
        check_order(r["tool_calls"], tools.PASS_SCORE, r["qe_scores"])
        assert r["format_valid"] and r["stop_reason"] == "answer"
        assert r["final_image_index"] is not None and r["mask_index"] is not None
    refined = [r for r in records if len(r["attempts"]) >= 2]
    assert refined, "the expert never had to refine"
    assert all(r["final_score"] > r["qe_scores"][0] for r in refined)
    assert any("knowledge_retrieval" in r["tool_calls"] for r in refined)


def test_expert_is_deterministic_per_seed(toy):
    c = "bottle"
    task = tools.Task(id="x", category=c, anomaly_type="crack", image=toy.load(toy.train_good[c][0]),
                      kind="object", seed=7)
    a, b = (tools.run_episodes(tools.ExpertPolicy(seed=3), [task], tools.Toolbox())[0] for _ in range(2))
    assert [m["content"] for m in a["messages"] if m["role"] == "assistant"] == \
           [m["content"] for m in b["messages"] if m["role"] == "assistant"]
    assert np.array_equal(a["images"][-2], b["images"][-2])


def test_expert_works_without_knowledge_retrieval(toy):
    box = tools.Toolbox(["prompt_gen", "image_gen", "quality_eval", "mask_gen"])
    tasks = [tools.Task(id=str(i), category="washer", anomaly_type=t,
                        image=toy.load(toy.train_good["washer"][i]), kind="object", seed=i)
             for i in range(4) for t in toy.types("washer")]
    for r in tools.run_episodes(tools.ExpertPolicy(), tasks, box):
        assert "knowledge_retrieval" not in r["tool_calls"] and r["stop_reason"] == "answer"
        assert r["tool_calls"][-2:] == ["mask_gen", "answer"]


class ProseJudge:
    """A judge that writes only a score and a prose review, as a vision-language model might: no advice."""

    def __init__(self):
        self.inner = tools.MeasuredJudge()

    def evaluate(self, normal, candidate, kind, entry):
        result = self.inner.evaluate(normal, candidate, kind, entry)
        return {"score": result["score"], "review": "I would change a few things about this defect."}


def test_expert_plays_against_a_judge_that_gives_no_advice(toy):
    box = tools.Toolbox(judge=ProseJudge())
    tasks = [tools.Task(id=f"{c}/{t}", category=c, anomaly_type=t, image=toy.load(toy.train_good[c][0]),
                        kind=toy.kinds[c], seed=11) for c in toy.eval_categories for t in toy.types(c)]
    records = tools.run_episodes(tools.ExpertPolicy(seed=0), tasks, box, max_turns=10)
    for r in records:
        assert r["format_valid"] and r["stop_reason"] == "answer"
        assert r["tool_calls"][-2:] == ["mask_gen", "answer"] and r["mask_index"] is not None
    # the judge failed some first attempts, so the expert refined without advice, and said so
    refined = [r for r in records if len(r["attempts"]) >= 2]
    assert refined and all("advice" not in json.loads(tools.message_text(m))
                           for r in refined for m in r["messages"] if m["role"] == "tool")
