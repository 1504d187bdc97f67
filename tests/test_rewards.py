"""rewards.py on hand-written trajectories: each component does its job."""
import pytest

import rewards
import tools

ALL_TOOLS = tools.system_prompt(tools.Toolbox().specs())


def trajectory(*steps, final_score=None, format_valid=True, system=ALL_TOOLS):
    """A trajectory as Episode.record() writes it, from steps such as "prompt_gen",
    ("quality_eval", 3.0) or "answer"."""
    turns, scores = [], []
    for step in steps:
        name, score = step if isinstance(step, tuple) else (step, None)
        if name in ("answer", "malformed"):
            turns.append({"action": name, "tool": None, "format_ok": name == "answer"})
            continue
        result = {"score": score} if score is not None else {}
        if score is not None:
            scores.append(score)
        turns.append({"action": "call", "tool": name, "format_ok": True, "result": result})
    answered = any(t["action"] == "answer" for t in turns)
    return {"messages": [{"role": "system", "content": system}], "turns": turns,
            "answer": {"final_image_index": 2} if answered else None,
            "final_score": final_score if answered else None, "qe_scores": scores,
            "format_valid": format_valid and all(t["format_ok"] for t in turns)}


CANONICAL = ("prompt_gen", "image_gen", ("quality_eval", 3.0), "knowledge_retrieval", "image_gen",
             ("quality_eval", 7.0), "mask_gen", "answer")


@pytest.mark.parametrize("scores, expected", [
    ([3.0, 7.0], 0.7), ([9.0], 0.9), ([2.0, 4.0, 9.0], 0.9), ([5.0, 3.0, 8.0], 1.0), ([6.0, 6.0], 0.6),
    ([], 0.0), ([7.0, 3.0], 0.7), ([0.0, 10.0, 0.0, 10.0], 1.0)])
def test_reflection_reward_counts_from_zero_and_is_capped(scores, expected):
    assert rewards.reflection_reward(scores) == pytest.approx(expected)


def test_a_first_try_pass_earns_as_much_as_failing_first():
    first_try = trajectory("prompt_gen", "image_gen", ("quality_eval", 9.0), "mask_gen", "answer", final_score=9.0)
    detour = trajectory("prompt_gen", "image_gen", ("quality_eval", 3.0), "image_gen", ("quality_eval", 9.0),
                        "mask_gen", "answer", final_score=9.0)
    assert rewards.total_reward(first_try)["total"] >= rewards.total_reward(detour)["total"]
    # the old convention paid 0.6 * 0.2 = 0.12 more for the detour
    old = {k: rewards.total_reward(t, ref_baseline="first")["total"] for k, t in
           (("first_try", first_try), ("detour", detour))}
    assert old["detour"] - old["first_try"] == pytest.approx(0.2 * 0.6)


@pytest.mark.parametrize("scores, expected", [
    ([3.0, 7.0], 0.4), ([9.0], 0.0), ([2.0, 4.0, 9.0], 0.7), ([5.0, 3.0, 8.0], 0.5), ([6.0, 6.0], 0.0),
    ([], 0.0), ([2.0, 5.0, 4.0, 8.0], 0.7), ([0.0, 10.0, 0.0, 10.0], 2.0)])
def test_ref_baseline_first_keeps_the_old_values(scores, expected):
    assert rewards.reflection_reward(scores, baseline="first") == pytest.approx(expected)


def test_an_unknown_ref_baseline_is_refused():
    with pytest.raises(ValueError, match="ref baseline"):
        rewards.reflection_reward([3.0], baseline="last")


def test_task_reward_is_the_answered_score_and_zero_without_an_answer():
    assert rewards.task_reward(trajectory(*CANONICAL, final_score=7.0)) == pytest.approx(0.7)
    no_answer = trajectory(*CANONICAL[:-1], final_score=7.0)
    assert rewards.task_reward(no_answer) == 0.0
    never_judged = trajectory("prompt_gen", "image_gen", "mask_gen", "answer", final_score=None)
    assert rewards.task_reward(never_judged) == 0.0


def test_a_valid_episode_has_full_behaviour_reward():
    assert rewards.transitions(trajectory(*CANONICAL, final_score=7.0)) == [None] * len(CANONICAL)
    assert rewards.behavior_reward(trajectory(*CANONICAL, final_score=7.0)) == 1.0


@pytest.mark.parametrize("steps, rule", [
    (("image_gen", "prompt_gen", ("quality_eval", 7.0), "mask_gen", "answer"), "IG before PG"),
    (("prompt_gen", "prompt_gen", "image_gen", ("quality_eval", 7.0), "mask_gen", "answer"), "PG twice"),
    (("prompt_gen", "knowledge_retrieval", "image_gen", ("quality_eval", 7.0), "mask_gen", "answer"),
     "KR before a failed QE"),
    (("prompt_gen", "image_gen", ("quality_eval", 3.0), "mask_gen", "answer"), "MG before a passing QE"),
    (("prompt_gen", "image_gen", ("quality_eval", 7.0), "answer"), "answer before MG"),
])
def test_an_invalid_tool_order_lowers_the_behaviour_reward(steps, rule):
    bad = trajectory(*steps, final_score=7.0)
    assert rule in rewards.transitions(bad)
    assert rewards.behavior_reward(bad) < 1.0
    assert rewards.behavior_reward(bad) == pytest.approx(1.0 - 1.0 / len(steps))   # one invalid turn of T


def test_rules_for_switched_off_tools_do_not_apply():
    system = tools.system_prompt([tools.tool_spec(n) for n in ("image_gen", "quality_eval", "mask_gen")])
    steps = ("image_gen", ("quality_eval", 7.0), "mask_gen", "answer")
    assert rewards.behavior_reward(trajectory(*steps, final_score=7.0, system=system)) == 1.0
    assert rewards.behavior_reward(trajectory(*steps, final_score=7.0)) < 1.0


def test_turn_penalty_kr_bonus_well_formedness_and_clipping():
    long = ("prompt_gen", "image_gen", ("quality_eval", 3.0), "image_gen", ("quality_eval", 4.0),
            "image_gen", ("quality_eval", 7.0), "mask_gen", "answer", "answer")   # T = 10
    t = trajectory(*long, final_score=7.0)
    assert rewards.behavior_reward(t) == pytest.approx(1.0 - 0.1 * 2)
    # a malformed turn costs the well-formed term; KR after a failed QE earns lambda_KR on top
    with_kr = trajectory(*CANONICAL[:-1], "malformed")                 # T = 8: no turn penalty
    without_kr = trajectory(*(s for s in CANONICAL[:-1] if s != "knowledge_retrieval"), "malformed")
    assert rewards.behavior_reward(with_kr) == pytest.approx(0.1)
    assert rewards.behavior_reward(without_kr) == pytest.approx(0.0)
    chaos = trajectory("answer", "mask_gen", "knowledge_retrieval", "malformed", final_score=None)
    assert rewards.behavior_reward(chaos, phi_invalid=-5.0) == -1.0


def test_total_is_the_weighted_sum_and_weights_ablate():
    t = trajectory(*CANONICAL, final_score=7.0)
    parts = rewards.total_reward(t)
    assert parts["total"] == pytest.approx(0.6 * 0.7 + 0.2 * 0.7 + 0.2 * 1.0)
    assert rewards.total_reward(t, ref_baseline="first")["total"] == pytest.approx(0.6 * 0.7 + 0.2 * 0.4 + 0.2 * 1.0)
    assert rewards.total_reward(t, beta=0, gamma=0)["total"] == pytest.approx(0.6 * 0.7)
