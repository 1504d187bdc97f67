"""rl.py: GRPO's advantages and loss against direct computations, an update that moves the policy
the right way, and the script end to end (smoke, ablation flags, NaN guard, resume after a kill)."""
import json
import random
import runpy
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import rl
import tools
from conftest import ROOT, run_script, run_torchrun


# ---- the formulas -------------------------------------------------------------------------------

def test_advantages_are_group_normalized_and_flat_groups_dropped():
    advantages, keep = rl.grpo_advantages([1.0, 3.0, 0.5, 0.5, 2.0, 2.0, 2.0, 6.0], group_size=2)
    assert advantages.tolist()[:2] == pytest.approx([-1.0, 1.0], abs=1e-5)   # (R - mean) / std, std = 1
    assert advantages[2:4].tolist() == [0.0, 0.0] and keep.tolist()[:4] == [True, True, False, False]
    four, keep4 = rl.grpo_advantages([0.0, 1.0, 2.0, 3.0], group_size=4)
    std = torch.tensor([0.0, 1.0, 2.0, 3.0]).std(unbiased=False)
    assert four.tolist() == pytest.approx(((torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / std).tolist(), abs=1e-5)
    assert keep4.all()


def direct_loss(logp, old, ref, advantages, mask, eps, beta):
    """The objective token by token, with plain Python floats."""
    total, n = 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                rho = float(torch.exp(logp[i, t] - old[i, t]))
                a = float(advantages[i])
                surrogate = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
                d = float(ref[i, t] - logp[i, t])
                total += surrogate - beta * (float(torch.exp(torch.tensor(d))) - d - 1)
                n += 1
    return -total / n


def random_case(seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g) * 3
    old = logp + torch.randn(shape, generator=g) * 0.3
    ref = logp + torch.randn(shape, generator=g) * 0.3
    mask = (torch.rand(shape, generator=g) > 0.3).float()
    advantages = torch.randn(shape[0], generator=g)
    return logp, old, ref, advantages, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_loss_matches_a_direct_per_token_computation(seed):
    logp, old, ref, advantages, mask = random_case(seed)
    loss, stats = rl.grpo_loss(logp, old, ref, advantages, mask, clip_eps=0.2, kl_coef=0.04)
    assert loss.item() == pytest.approx(direct_loss(logp, old, ref, advantages, mask, 0.2, 0.04), rel=1e-5)
    assert 0 <= stats["clip_fraction"] <= 1 and stats["kl"] >= 0


def test_rho_one_gives_the_plain_policy_gradient_and_masked_tokens_get_none():
    logp, _, ref, advantages, mask = random_case(3)
    logp = logp.clone().requires_grad_(True)
    loss, _ = rl.grpo_loss(logp, logp.detach(), ref, advantages, mask, clip_eps=0.2, kl_coef=0.0)
    loss.backward()
    expected = -advantages[:, None] * mask / mask.sum()       # d/dlogp of -mean(A * logp)
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert (logp.grad[mask == 0] == 0).all()


def test_zero_variance_groups_contribute_nothing_and_clipping_stops_the_gradient():
    logp, old, ref, _, mask = random_case(4)
    advantages, _ = rl.grpo_advantages([0.7, 0.7, 0.7], group_size=3)
    logp = logp.clone().requires_grad_(True)
    rl.grpo_loss(logp, old, ref, advantages, mask, clip_eps=0.2, kl_coef=0.0)[0].backward()
    assert (logp.grad == 0).all()
    # rho far above 1 + eps with A > 0: the clipped branch is the minimum, so no gradient
    high = torch.zeros(1, 3, requires_grad=True)
    rl.grpo_loss(high, torch.full((1, 3), -1.0), high.detach(), torch.ones(1), torch.ones(1, 3), 0.2, 0.0)[0].backward()
    assert (high.grad == 0).all()


def test_k3_kl_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))
    _, same = rl.grpo_loss(logp, logp, logp, torch.zeros(1), torch.ones(1, 3), 0.2, 1.0)
    _, apart = rl.grpo_loss(logp, logp, logp - 0.5, torch.zeros(1), torch.ones(1, 3), 0.2, 1.0)
    assert same["kl"] == 0.0 and apart["kl"] > 0


# ---- the update on a real (tiny) policy ---------------------------------------------------------

@pytest.fixture(scope="module")
def expert_records(toy):
    plan = tools.plan_tasks(toy, "nut,tile", per_type=1)
    return tools.run_episodes(tools.ExpertPolicy(), [tools.make_task(toy, p) for p in plan], tools.Toolbox())


@pytest.fixture(scope="module")
def tiny_model_dir(expert_records, tmp_path_factory):
    """A random tiny policy whose tokenizer knows the agent's language, saved like sft.py saves."""
    texts = [tools.message_text(m) for r in expert_records for m in r["messages"]]
    path = tmp_path_factory.mktemp("rl") / "policy"
    tools.tiny_policy(texts, image_side=128).save(path)
    return path


def test_update_raises_the_likelihood_of_better_episodes(expert_records, tiny_model_dir):
    args = rl.get_args(["--policy", str(tiny_model_dir), "--lr", "1e-3", "--ppo-epochs", "3",
                        "--minibatch", "2", "--micro-batch", "1", "--lora", "off"])
    policy, reference, _, lr = rl.load_models(args)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    good, bad = expert_records[0]["messages"], expert_records[1]["messages"]

    def mean_logp(messages):
        with torch.no_grad():
            logp, mask = policy.token_logprobs(policy.encode([messages]))
        return float((logp * mask).sum() / mask.sum())

    before = mean_logp(good), mean_logp(bad)
    stats = rl.update(policy, reference, optimizer, params, [(good, 1.0), (bad, -1.0)], args,
                      rl.nullcontext)
    after = mean_logp(good), mean_logp(bad)
    # the two expert episodes share most of their tokens, so pushing the bad one down also pulls on
    # the good one: the update must lower the bad one and raise the good one relative to it
    # (the good one's own likelihood rises or falls with the random initialization)
    assert after[1] < before[1] and after[0] - before[0] > after[1] - before[1]
    assert stats["kl"] > 0 and stats["tokens"] > 0
    with reference():    # the reference stays the starting policy
        assert mean_logp(good) == pytest.approx(before[0], abs=1e-5)


# ---- rl.py end to end ----------------------------------------------------------------------------

def tiny_args(model, toy_root, out, *extra):
    return [str(a) for a in ["--policy", model, "--data-root", toy_root, "--out", out, "--group-size", "2",
                             "--prompts-per-step", "1", "--max-turns", "2", "--max-new-tokens", "12",
                             "--eval-per-type", "1", "--eval-every", "0", "--micro-batch", "2",
                             "--minibatch", "2", *extra]]


def test_rl_smoke_and_ablation_flags(tiny_model_dir, toy_root, tmp_path):
    out = tmp_path / "default"
    result = run_script("rl.py", *tiny_args(tiny_model_dir, toy_root, out, "--steps", "2"))
    assert result.returncode == 0, result.stderr
    assert "Held-out" in result.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert {"reward_mean", "task_std", "behavior_mean", "final_qe", "turns", "well_formed", "groups_kept",
            "seconds", "eval_reward_mean", "eval_reward_se", "eval_reward_gain", "eval_reward_gain_se",
            "eval_final_qe_gain_se"} <= set(metrics[-1])
    assert len(metrics[0]["eval_episode_rewards"]) == len(metrics[-1]["eval_episode_rewards"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["paired_gain"]) == {"eval_reward_gain", "eval_reward_gain_se", "eval_final_qe_gain",
                                           "eval_final_qe_gain_se"}
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "run_config.json").exists()
    assert tools.VLMPolicy.load(out).model is not None
    assert [m["lr"] for m in metrics[1:]] == pytest.approx([3e-5 / 4, 3e-5 / 2])   # tiny lr, warming up
    config = json.loads((out / "run_config.json").read_text())   # the tiny policy's defaults, resolved
    assert (config["temperature"], config["kl_coef"]) == (0.7, 0.2)
    # each ablation is a flag: one step of each runs to the end and is recorded in the settings
    for name, flags, saved in [("task-only", ["--beta", "0", "--gamma", "0"], {"beta": 0.0, "gamma": 0.0}),
                               ("no-kr", ["--tools", "PG,IG,QE,MG"], {"tools": "PG,IG,QE,MG"}),
                               ("old-ref", ["--ref-baseline", "first"], {"ref_baseline": "first"})]:
        out = tmp_path / name
        result = run_script("rl.py", *tiny_args(tiny_model_dir, toy_root, out, "--steps", "1", *flags))
        assert result.returncode == 0, result.stderr
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
        config = json.loads((out / "run_config.json").read_text())
        assert {k: config[k] for k in saved} == saved and (out / "summary.json").exists()


def test_paired_difference_and_standard_errors():
    assert rl.standard_error([1.0, 3.0]) == pytest.approx(1.0) and rl.standard_error([2.0]) == 0.0
    # the same prompts: a shared offset cancels, so the paired s.e. is that of the differences only
    mean, se = rl.paired_difference([0.5, 0.9, 0.2, 0.7], [0.6, 1.0, 0.3, 0.8])
    assert mean == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12)
    mean, se = rl.paired_difference([8.0, None, 6.0], [9.0, 7.0, None])   # pairs with a missing QE drop out
    assert mean == 1.0 and se == 0.0


def test_ref_baseline_flag_reaches_the_reward():
    record = {"answer": {"final_image_index": 2}, "final_score": 9.0, "qe_scores": [9.0], "turns": [],
              "messages": [{"role": "system", "content": ""}], "format_valid": True}
    for flag, expected in (("zero", 0.9), ("first", 0.0)):
        assert rl.score([record], rl.get_args(["--ref-baseline", flag]))[0]["reflection"] == pytest.approx(expected)


def test_steps_deal_every_category_type_pair_in_turn(toy):
    pool = rl.prompt_pool(toy, 0)
    pairs = {(p["category"], p["anomaly_type"]) for p in pool}
    pair = lambda p: (p["category"], p["anomaly_type"])   # noqa: E731
    # 4 prompts a step: the first len(pairs) deals hold every pair once, whichever steps they fall in
    deals = [p for step in range(4) for p in rl.step_prompts(pool, 4, step, seed=0)]
    assert sorted(map(pair, deals[:len(pairs)])) == sorted(pairs)
    # a step of as many prompts as pairs covers them all, each on a training image of its pair
    for step in range(3):
        prompts = rl.step_prompts(pool, len(pairs), step, seed=0)
        assert {pair(p) for p in prompts} == pairs and all(p in pool for p in prompts)
    # a function of (seed, step): a resumed run draws the same prompts; another seed, others
    assert rl.step_prompts(pool, 4, 7, seed=0) == rl.step_prompts(pool, 4, 7, seed=0)
    assert [p["id"] for s in range(4) for p in rl.step_prompts(pool, 4, s, seed=1)] != [p["id"] for p in deals]


def test_learning_rate_warms_up_then_stays():
    def schedule(**flags):
        args = rl.get_args([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])
        return [rl.lr_at(step, 1.0, args) for step in range(args.steps)]
    assert schedule(steps=6, warmup_steps=2) == pytest.approx([0.5, 1, 1, 1, 1, 1])
    assert schedule(steps=6, warmup_steps=0) == pytest.approx([1] * 6)


def test_nan_loss_stops_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, toy_root, tmp_path,
                                                                    monkeypatch):
    # the random tiny policy's episodes all earn the same reward; random rewards make every group
    # count, so the real update path runs
    generator = torch.Generator().manual_seed(0)
    monkeypatch.setattr(rl, "score", lambda records, args: [
        {"total": float(torch.rand(1, generator=generator)), "task": 0.0, "reflection": 0.0, "behavior": 0.0}
        for _ in records])
    real_loss, calls = rl.grpo_loss, []

    def loss_that_breaks(*a, **k):
        calls.append(1)
        loss, stats = real_loss(*a, **k)
        return (loss * float("nan") if len(calls) > 1 else loss), stats

    monkeypatch.setattr(rl, "grpo_loss", loss_that_breaks)
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, toy_root, out, "--steps", "3", "--ppo-epochs", "1")
    with pytest.raises(tools.UserError, match="step 2: the GRPO loss is nan.*last good checkpoint"):
        rl.main(args)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_rl_resume_continues_after_a_kill(tiny_model_dir, toy_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, toy_root, out, "--steps", "4")
    process = subprocess.Popen([sys.executable, str(ROOT / "rl.py"), *map(str, args)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.kill()
    process.wait()
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    result = run_script("rl.py", *args, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resuming after step {saved} of 4" in result.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]          # nothing lost, nothing logged twice
    other = run_script("rl.py", *tiny_args(tiny_model_dir, toy_root, out, "--steps", "5", "--group-size", "3"),
                       "--resume")
    assert other.returncode != 0 and "--group-size 2 -> 3" in other.stderr


def test_rl_rerun_after_a_kill_before_the_first_checkpoint(tiny_model_dir, toy_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, toy_root, out, "--steps", "2", "--save-every", "2")   # saves at the end
    process = subprocess.Popen([sys.executable, str(ROOT / "rl.py"), *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:   # step 0 is logged
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()
    assert rl.resume_state(out, rl.get_args(["--out", str(out), "--resume"])) is None   # --resume starts over too
    result = run_script("rl.py", *tiny_args(tiny_model_dir, toy_root, out, "--steps", "1"))   # a plain rerun
    assert result.returncode == 0, result.stderr
    assert "holds no checkpoint yet: starting over" in result.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    finished = run_script("rl.py", *tiny_args(tiny_model_dir, toy_root, out, "--steps", "1"), "--resume")
    assert finished.returncode != 0 and "is finished (step 1 of --steps 1)" in finished.stderr


def test_an_update_on_two_ranks_is_the_update_of_one_process(expert_records, tiny_model_dir, tmp_path,
                                                               monkeypatch):
    """Four conversations, two per rank, one SGD step (its size is the gradient's, where Adam's
    would hide a wrong scale): the step and the token-weighted statistics of one process."""
    buffer = [(r["messages"], a) for r, a in zip(expert_records[:4], [1.0, -1.0, 0.5, -0.25])]
    torch.save(buffer, tmp_path / "buffer.pt")
    script = tmp_path / "one_update.py"
    script.write_text(f"""import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import rl, tools
tools.init_distributed("cpu")
args = rl.get_args(["--policy", {str(tiny_model_dir)!r}, "--ppo-epochs", "1", "--minibatch", "4",
                    "--micro-batch", "1", "--lora", "off", "--grad-clip", "1e9", "--lr", "1.0"])
policy, reference, _, _ = rl.load_models(args)
params = [p for p in policy.model.parameters() if p.requires_grad]
buffer = tools.shard(torch.load({str(tmp_path / "buffer.pt")!r}, weights_only=False))
stats = rl.update(policy, reference, torch.optim.SGD(params, lr=args.lr), params, buffer, args, rl.nullcontext)
if tools.is_main():
    torch.save((stats, {{n: p.detach() for n, p in policy.model.named_parameters() if p.requires_grad}}), sys.argv[1])
tools.leave()
""")
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "one.pt")])
    runpy.run_path(str(script), run_name="__main__")   # without torchrun: one process, this one
    result = run_torchrun(script, 2, tmp_path / "two.pt")
    assert result.returncode == 0, result.stderr
    start = tools.VLMPolicy.load(tiny_model_dir).model.state_dict()
    (one, one_weights), (two, two_weights) = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert two == pytest.approx(one, rel=1e-5) and one["tokens"] > 0
    moved = max(float((w - start[n]).abs().max()) for n, w in one_weights.items())
    assert moved > 1e-3 and max(float((w - two_weights[n]).abs().max()) for n, w in one_weights.items()) <= 1e-5 * moved


def test_rl_under_torchrun_logs_every_rank_s_episodes_updates_and_resumes(tiny_model_dir, toy_root, toy, tmp_path):
    """Two ranks, one prompt (a whole group) each. The random tiny policy's episodes all tie, so a
    wrapper scores each episode by its id: every group then counts, the update runs on both ranks,
    and the log shows which episodes it holds."""
    script = tmp_path / "rl_scored_by_id.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import rl, tools
rl.score = lambda records, args: [dict(total=float(tools.stable_seed(r["id"]) % 7), task=0.0, reflection=0.0,
                                       behavior=0.0) for r in records]
rl.main(sys.argv[1:])
""")
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, toy_root, out, "--prompts-per-step", "2", "--steps", "1")
    result = run_torchrun(script, 2, *args)
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    prompts = rl.step_prompts(rl.prompt_pool(toy, 0), 2, 0, 0)
    rewards = [tools.stable_seed(f"{p['id']}/{g}") % 7 for p in prompts for g in range(2)]
    assert metrics[1]["episodes"] == 4 and metrics[1]["reward_mean"] == pytest.approx(np.mean(rewards))
    assert metrics[1]["groups_kept"] == sum(a != b for a, b in zip(rewards[::2], rewards[1::2]))
    assert metrics[1]["tokens"] > 0 and metrics[1]["kl"] > 0   # the update ran
    held_out = rl.validation_prompts(toy, 1, 0)   # shared out, gathered back in plan order
    assert metrics[0]["eval_episode_rewards"] == [tools.stable_seed(p["id"]) % 7 for p in held_out]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1
    assert tools.VLMPolicy.load(out).model is not None and (out / "summary.json").exists()
    resumed = run_torchrun(script, 2, *args[:-1], "2", "--resume")   # --steps 2: every rank loads the checkpoint
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after step 1 of 2" in resumed.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize("flags, message", [
    (["--save-every", "0"], "--save-every must be at least 1, not 0"),
    (["--prompts-per-step", "0"], "--prompts-per-step must be at least 1"),
    (["--eval-per-type", "0"], "--eval-per-type must be at least 1"),
    (["--micro-batch", "0"], "--micro-batch must be at least 1"),
    (["--max-turns", "0"], "--max-turns must be at least 1"),
    (["--eval-every", "-1"], "--eval-every must be at least 0"),
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--kl-coef", "-0.1"], "--kl-coef must be at least 0"),
])
def test_numeric_flags_are_checked_when_parsed(flags, message):
    with pytest.raises(tools.UserError, match=message):
        rl.get_args(flags)


def test_rl_bad_input(tmp_path, toy_root, tiny_model_dir):
    for args, message in [(["--policy", "runs/no-such-sft"], "run sft.py first"),
                          (["--policy", tiny_model_dir, "--group-size", "1"], "--group-size must be at least 2 (GRPO"),
                          (["--policy", tiny_model_dir, "--resume"], "no checkpoint.pt"),
                          (["--policy", tiny_model_dir, "--tools", "PG,QE"], "must include IG"),
                          (["--policy", tiny_model_dir, "--prompts-per-step", "100000"],
                           "--prompts-per-step must be at most")]:
        result = run_script("rl.py", *args, "--data-root", toy_root, "--out", tmp_path / "o")
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
