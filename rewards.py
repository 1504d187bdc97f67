"""
rewards.py -- the three rewards of multi-turn GRPO (docs/METHOD.md section 6).

    R = alpha * R_task + beta * R_ref + gamma * R_beh

Each reward reads one trajectory as tools.Episode.record() writes it (the same dict that
synthesize.py saves in trajectories.jsonl), so any saved run can be re-scored. Every constant is an
argument with docs/METHOD.md's default; rl.py puts each on the command line.

Decisions where docs/METHOD.md is terse:
- R_task reads the score the judge gave the answered image during the episode; an answer naming an
  image the agent never judged earns 0, like no answer (the agent must check before it answers).
- Phi depends on what came before, not only on the previous tool ("KR before a failed QE" looks at
  the whole history); malformed turns are not transitions (Phi 0; the well-formed term sees them).
- The KR bonus is paid once, if any KR call directly follows a failed QE, so it cannot be farmed.
- R_ref's sum starts from S_0 = 0, so a first attempt that already passes earns what a weak first
  attempt and a good second one earn together, and is capped at 1: otherwise the reward would pay
  the agent for failing on purpose. ref_baseline="first" counts from the first attempt instead
  (improvements from the second attempt on, uncapped), for comparison.
"""
import tools

ALPHA, BETA, GAMMA = 0.6, 0.2, 0.2
PHI_INVALID, LAMBDA_KR, LAMBDA_T, T_MAX = -1.0, 0.1, 0.1, 8


def task_reward(traj) -> float:
    """R_task = S_final / 10, the judge's score of the image named in the answer; 0 without an
    answer (or when that image was never judged)."""
    if traj["answer"] is None or traj["final_score"] is None:
        return 0.0
    return traj["final_score"] / 10


REF_BASELINES = ("zero", "first")


def reflection_reward(scores, baseline="zero") -> float:
    """R_ref = min(1, sum over attempts m >= 1 of max(0, S_m - S_{m-1}) / 10) with S_0 = 0: a
    first-try pass at 9 earns 0.9, as 3 -> 9 does, and 5 -> 3 -> 8 earns the cap, 1.
    baseline="first": sum over m >= 2 only, uncapped (a first-try pass earns 0)."""
    if baseline not in REF_BASELINES:
        raise ValueError(f"ref baseline {baseline!r}: expected one of {REF_BASELINES}")
    if baseline == "first":
        return sum(max(0.0, b - a) for a, b in zip(scores, scores[1:])) / 10
    return min(1.0, sum(max(0.0, b - a) for a, b in zip([0.0, *scores], scores)) / 10)


def transitions(traj) -> list:
    """Phi's verdict per turn: None for a valid step, else the rule it breaks. Rules that need a tool
    the run switched off (e.g. IG before PG when there is no PG) do not apply."""
    available = set(tools.system_tools(traj["messages"]))
    seen, failed_qe, passed_qe, verdicts = set(), False, False, []
    for turn in traj["turns"]:
        step = turn["tool"] or turn["action"]
        broken = None
        if step == "prompt_gen" and "prompt_gen" in seen:
            broken = "PG twice"
        elif step == "image_gen" and "prompt_gen" in available and "prompt_gen" not in seen:
            broken = "IG before PG"
        elif step == "knowledge_retrieval" and "quality_eval" in available and not failed_qe:
            broken = "KR before a failed QE"
        elif step == "mask_gen" and "quality_eval" in available and not passed_qe:
            broken = "MG before a passing QE"
        elif step == "answer" and "mask_gen" in available and "mask_gen" not in seen:
            broken = "answer before MG"
        verdicts.append(broken)
        score = (turn.get("result") or {}).get("score") if step == "quality_eval" else None
        if score is not None:
            failed_qe, passed_qe = failed_qe or score < tools.PASS_SCORE, passed_qe or score >= tools.PASS_SCORE
        if step in tools.TOOL_SCHEMAS or step == "answer":
            seen.add(step)
    return verdicts


def kr_after_failed_qe(traj) -> bool:
    """Did the agent look up knowledge right after a check it failed?"""
    previous = None
    for turn in traj["turns"]:
        if turn["tool"] == "knowledge_retrieval" and previous is not None and previous < tools.PASS_SCORE:
            return True
        previous = (turn.get("result") or {}).get("score") if turn["tool"] == "quality_eval" else None
    return False


def behavior_reward(traj, phi_invalid=PHI_INVALID, lambda_kr=LAMBDA_KR, lambda_t=LAMBDA_T, t_max=T_MAX) -> float:
    """R_beh = mean over turns of Phi (0 valid, phi_invalid for an invalid step) + lambda_kr if KR
    follows a failed QE + 1[every turn well formed] - lambda_t * max(0, T - t_max), clipped to [-1, 1]."""
    verdicts = transitions(traj)
    T = len(verdicts)
    phi = sum(phi_invalid for v in verdicts if v) / max(T, 1)
    value = (phi + lambda_kr * kr_after_failed_qe(traj) + float(traj["format_valid"])
             - lambda_t * max(0, T - t_max))
    return max(-1.0, min(1.0, value))


def total_reward(traj, alpha=ALPHA, beta=BETA, gamma=GAMMA, ref_baseline="zero", **behavior) -> dict:
    """R = alpha * R_task + beta * R_ref + gamma * R_beh, with each component (for the logs)."""
    parts = {"task": task_reward(traj), "reflection": reflection_reward(traj["qe_scores"], ref_baseline),
             "behavior": behavior_reward(traj, **behavior)}
    parts["total"] = alpha * parts["task"] + beta * parts["reflection"] + gamma * parts["behavior"]
    return parts
