"""
rl.py -- multi-turn GRPO with the three rewards (docs/METHOD.md sections 5-6), written by hand.

    python build_trajectories.py && python sft.py && python rl.py     # toy world, tiny policy
    python rl.py --beta 0 --gamma 0 --out runs/rl-task-only           # ablation: task reward only
    python rl.py --tools PG,IG,QE,MG --out runs/rl-no-kr              # ablation: no knowledge tool
    python rl.py --data visa --data-root /data/VisA --policy runs/sft-visa --lora on   # paper setting

Each step:
1. rollout: --prompts-per-step prompts (a normal image of a training-group category and an anomaly
   type; the steps deal the (category, type) pairs in turn), each played --group-size times at
   --temperature against the real tools, all live episodes answered by one batched policy call per
   turn (tools.run_episodes);
2. rewards: R = alpha * R_task + beta * R_ref + gamma * R_beh per trajectory (rewards.py);
3. advantages: normalized within each prompt's group; groups whose rewards are all equal carry no
   signal and are dropped;
4. update: the step's kept trajectories form the replay buffer; --ppo-epochs passes over it in
   mini-batches, each an AdamW step on the clipped surrogate minus the k3 KL to the frozen SFT
   policy, a token mean over the tokens the policy wrote. The learning rate warms up linearly over
   --warmup-steps: Adam's first update moves every weight by the full learning rate whatever the
   gradient's size, and on the tiny policy that one step alone cost a KL of 0.2 (README).
Every --eval-every steps (and before the first) greedy episodes on held-out prompts (the training
categories' test normal images, never RL prompts) give the held-out mean reward and final QE
score. OUT gets metrics.jsonl (one line per step), reward_curve.png, run_config.json,
checkpoint.pt (every --save-every steps; --resume continues from it) and, at the end, the model
(--policy OUT in synthesize.py) and summary.json.

Where this departs from textbook GRPO (each a choice, and why):
- advantages are normalized by the group's standard deviation, and groups whose rewards are all
  equal (no signal) are dropped from the update rather than kept with advantage 0;
- the loss is a token mean over each mini-batch's policy-written tokens (not a per-sequence mean), so
  a long turn weighs as much per token as a short one;
- the KL to the frozen SFT policy is the k3 estimator, uncapped (a cap let one seed drift away from
  the SFT format; README);
- the old log-probs are recomputed by a forward pass at the start of the update, not kept from
  sampling; and the policy's replies are stored as text and re-tokenized, so a turn is scored in the
  tokenizer's canonical split of the text the policy sampled;
- log-probs come from temperature-scaled logits, the distribution the rollout sampled from.

Several processes (`torchrun --nproc_per_node N rl.py ...`, README): each rank plays its share of
the step's prompts, whole groups, so advantages stay within a group, and keeps its own replay
buffer; every rank's rewards and statistics are gathered for the log, and the held-out prompts are
shared out and gathered too. Ranks keep different numbers of trajectories (flat groups are
dropped), so they run different numbers of forward passes, which DistributedDataParallel cannot
pair up; the gradients are summed once per optimizer step instead. The loss stays the token mean
of one process over the union of the ranks' mini-batches: each rank divides its summed token loss
by the mini-batch's token count over all ranks (an all_reduce), and the sum of the ranks'
gradients (another) is then exactly the gradient of that mean. Rank 0 writes the log and saves.
"""
import argparse
import copy
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import rewards
import tools


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default="toy", help="toy, mvtec or visa: prompts come from its training group")
    data.add_argument("--data-root", default=None, help="its folder")
    data.add_argument("--size", type=int, default=None, help="image side in pixels (toy 128, real 256)")
    model = p.add_argument_group("model")
    model.add_argument("--policy", default="runs/sft", help="the SFT model to start from (also the frozen KL reference)")
    model.add_argument("--lora", default="auto", choices=["auto", "on", "off"], help="LoRA adapters (auto: models over 1B)")
    model.add_argument("--lora-rank", type=int, default=16, help="LoRA rank")
    model.add_argument("--max-new-tokens", type=int, default=384, help="longest assistant turn")
    rollout = p.add_argument_group("rollout")
    rollout.add_argument("--group-size", type=int, default=8, help="episodes per prompt, G (paper: 8)")
    rollout.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step (paper: 16, a buffer of 128)")
    rollout.add_argument("--temperature", type=float, default=None,
                         help="sampling temperature (default: the paper's 1.0; models under 100M: 0.7, see README)")
    rollout.add_argument("--max-turns", type=int, default=10, help="turns per episode")
    rollout.add_argument("--tools", default="PG,IG,QE,KR,MG", help="tools the agent may call (ablations)")
    reward = p.add_argument_group("rewards (docs/METHOD.md 6)")
    reward.add_argument("--alpha", type=float, default=rewards.ALPHA, help="weight of R_task")
    reward.add_argument("--beta", type=float, default=rewards.BETA, help="weight of R_ref")
    reward.add_argument("--gamma", type=float, default=rewards.GAMMA, help="weight of R_beh")
    reward.add_argument("--phi-invalid", type=float, default=rewards.PHI_INVALID, help="Phi of an invalid step")
    reward.add_argument("--lambda-kr", type=float, default=rewards.LAMBDA_KR, help="bonus for KR right after a failed QE")
    reward.add_argument("--lambda-t", type=float, default=rewards.LAMBDA_T, help="penalty per turn beyond --t-max")
    reward.add_argument("--t-max", type=int, default=rewards.T_MAX, help="turns without penalty")
    reward.add_argument("--ref-baseline", default="zero", choices=rewards.REF_BASELINES,
                        help="R_ref counts improvements from S_0 = 0 (zero) or only from the first attempt on (first)")
    optim = p.add_argument_group("optimization")
    optim.add_argument("--steps", type=int, default=10, help="GRPO steps (rollout + update)")
    optim.add_argument("--lr", type=float, default=None,
                       help="AdamW learning rate (default: 1e-6 full, 1e-5 LoRA; models under 100M: 3e-5)")
    optim.add_argument("--warmup-steps", type=int, default=4,
                       help="GRPO steps of linear lr warmup (Adam's first updates are full-lr sign steps)")
    optim.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range of rho")
    optim.add_argument("--kl-coef", type=float, default=None,
                       help="weight of the k3 KL to the SFT policy (default: 0.04; models under 100M: 0.2, see README)")
    optim.add_argument("--ppo-epochs", type=int, default=2, help="passes over each replay buffer (paper: 2)")
    optim.add_argument("--minibatch", type=int, default=16, help="trajectories per optimizer step")
    optim.add_argument("--micro-batch", type=int, default=4, help="trajectories per forward pass")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/rl", help="output folder")
    run.add_argument("--eval-every", type=int, default=5, help="steps between held-out evaluations (0: only at the end)")
    run.add_argument("--eval-per-type", type=int, default=8, help="held-out episodes per (training category, type), on test normal images")
    run.add_argument("--save-every", type=int, default=1, help="steps between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    run.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling and tools")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    tools.add_backend_flags(p)
    args = p.parse_args(argv)
    check_flags(args)
    return args


def check_flags(args) -> None:
    """Every numeric flag against its meaning: a bad value stops the run here, in one line.
    (--prompts-per-step is checked against the prompt pool once the data has loaded.)"""
    def require(ok, flag, allowed):
        if not ok:
            raise tools.UserError(f"--{flag} must be {allowed}, not {getattr(args, flag.replace('-', '_'))}")
    require(args.group_size >= 2, "group-size", "at least 2 (GRPO compares episodes within a group)")
    for flag in ("prompts-per-step", "max-turns", "max-new-tokens", "lora-rank", "steps", "ppo-epochs",
                 "minibatch", "micro-batch", "eval-per-type", "save-every"):
        require(getattr(args, flag.replace("-", "_")) >= 1, flag, "at least 1")
    for flag in ("warmup-steps", "eval-every", "t-max"):
        require(getattr(args, flag.replace("-", "_")) >= 0, flag, "at least 0")
    for flag in ("temperature", "lr", "clip-eps", "grad-clip"):
        value = getattr(args, flag.replace("-", "_"))
        require(value is None or value > 0, flag, "above 0")
    require(args.kl_coef is None or args.kl_coef >= 0, "kl-coef", "at least 0")


# ---- the policy and its frozen reference --------------------------------------------------------

def load_models(args):
    """The policy to train (vision tower frozen, its projector trained, LoRA on request) and a way
    to run the frozen SFT policy for the KL term."""
    if not Path(args.policy).exists() and args.policy.startswith(("runs/", "./", "/")):
        raise tools.UserError(f"--policy {args.policy}: no SFT model there; run sft.py first")
    policy = tools.load_policy(args.policy, seed=args.seed, device=args.device, max_new_tokens=args.max_new_tokens)
    n_params = sum(p.numel() for p in policy.model.parameters())
    # the tiny policy: its sampling at 1.0 breaks too many turns to learn from, and at lr 3e-5 a weak
    # pull to the SFT policy lets a few greedy episodes drift into broken turns
    small = n_params < 1e8
    if args.temperature is None:
        args.temperature = 0.7 if small else 1.0
    if args.kl_coef is None:
        args.kl_coef = 0.2 if small else 0.04
    policy.temperature = args.temperature
    use_lora = policy.make_trainable(args.lora, args.lora_rank)
    if use_lora:
        # sft.py saves its adapters merged, so the base model IS the SFT policy: switching the new
        # adapter off gives the reference without a second copy of the weights
        reference = policy.model.disable_adapter
    else:
        frozen = copy.deepcopy(policy.model).eval().requires_grad_(False)
        reference = lambda: ModelSwap(policy, frozen)   # noqa: E731
    lr = args.lr or (3e-5 if small else 1e-5 if use_lora else 1e-6)
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    print(f"policy {args.policy}: {n_params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained"
          f"{' (LoRA)' if use_lora else ''}, lr {lr:g}, temperature {args.temperature:g}")
    return policy, reference, use_lora, lr


class ModelSwap:
    """Run the wrapper with another model inside a with-block (the frozen reference)."""

    def __init__(self, policy, model):
        self.policy, self.model = policy, model

    def __enter__(self):
        self.policy.model, self.model = self.model, self.policy.model

    def __exit__(self, *exc):
        self.policy.model, self.model = self.model, self.policy.model


# ---- prompts and rollouts -----------------------------------------------------------------------

def prompt_pool(dataset, seed) -> list:
    """Every (normal training image, category, type) of the training group: the RL prompts."""
    n = max(len(dataset.train_good[c]) for c in dataset.train_categories)
    return tools.plan_tasks(dataset, ",".join(dataset.train_categories), per_type=n, seed=seed)


def step_prompts(pool, n, step, seed) -> list:
    """The n prompts of a step, spread over the (category, type) pairs: the pairs are dealt in
    cycles, each cycle a fresh seeded order of all of them, and a step takes the next n deals (each
    with a random image of its pair). With a uniform draw from the pool, a step trains a few pairs
    while the weights they share with the rest move those too, unchecked; dealing the pairs in
    turn keeps every pair in the updates. A function of (seed, step) only, so a resumed run draws
    what the uninterrupted one would."""
    by_pair = {}
    for p in pool:
        by_pair.setdefault((p["category"], p["anomaly_type"]), []).append(p)
    pairs = sorted(by_pair)
    prompts = []
    for deal in range(step * n, step * n + n):
        cycle, place = divmod(deal, len(pairs))
        order = random.Random(tools.stable_seed(seed, "cycle", cycle)).sample(pairs, len(pairs))
        choices = by_pair[order[place]]
        prompts.append(choices[tools.stable_seed(seed, "image", deal) % len(choices)])
    return prompts


def validation_prompts(dataset, per_type, seed) -> list:
    """Held-out prompts: the training group's categories and types on their test normal images,
    which are never RL prompts. (Zero-shot transfer to the evaluation group is synthesize.py's and
    evaluate.py's to measure.)"""
    plan = []
    for cat in dataset.train_categories:
        normals = dataset.test_good[cat] or dataset.train_good[cat]
        for t in dataset.types(cat):
            for i in range(per_type):
                plan.append(dict(id=f"val/{cat}/{t}/{i:03d}", category=cat, anomaly_type=t,
                                 path=normals[tools.stable_seed(seed, cat, t, i) % len(normals)],
                                 seed=tools.stable_seed(seed, "val", cat, t, i)))
    return plan


def rollout(policy, dataset, prompts, group_size, toolbox, max_turns) -> list:
    """group_size episodes per prompt, all played side by side. A group shares its task seed, so the
    tools answer the same call the same way and only the policy's choices differ."""
    tasks = []
    for p in prompts:
        for g in range(group_size):
            task = tools.make_task(dataset, p)
            task.id = f"{p['id']}/{g}"
            tasks.append(task)
    if hasattr(policy, "model"):   # the scripted expert has none (benchmarks/rewrites.py plays it)
        policy.model.eval()
    return tools.run_episodes(policy, tasks, toolbox, max_turns)


def score(records, args) -> list:
    weights = dict(alpha=args.alpha, beta=args.beta, gamma=args.gamma, phi_invalid=args.phi_invalid,
                   lambda_kr=args.lambda_kr, lambda_t=args.lambda_t, t_max=args.t_max,
                   ref_baseline=args.ref_baseline)
    return [rewards.total_reward(r, **weights) for r in records]


# ---- GRPO ---------------------------------------------------------------------------------------

def grpo_advantages(episode_rewards, group_size, judged=None, eps=1e-6):
    """A_i = (R_i - mean(R)) / (std(R) + eps) within each consecutive group of group_size, over the
    group's judged episodes (judged=False: its judge failed, so its reward means nothing and it is
    left out, keep=False); groups whose rewards are all equal get advantage 0 and keep=False (they
    would only add noise)."""
    r = torch.as_tensor(episode_rewards, dtype=torch.float64).view(-1, group_size)
    ok = torch.ones_like(r, dtype=torch.bool) if judged is None else torch.as_tensor(judged).view(-1, group_size)
    n = ok.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (r * ok).sum(dim=1, keepdim=True) / n
    std = (((r - mean) ** 2 * ok).sum(dim=1, keepdim=True) / n).sqrt()
    keep = (std > 1e-9) & ok
    advantages = torch.where(keep, (r - mean) / (std + eps), torch.zeros_like(r))
    return advantages.flatten().float(), keep.flatten()


def judge_failed(record) -> bool:
    """Whether a quality_eval call of the episode hit a backend error (a model judge's failure)."""
    return any(t["tool"] == "quality_eval" and t.get("backend_error") for t in record["turns"])


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef):
    """-mean over masked tokens of  min(rho A, clip(rho, 1 - eps, 1 + eps) A) - kl_coef * KL_k3,
    rho = exp(logp - old_logp), KL_k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0).
    logp, old_logp, ref_logp, mask: (batch, tokens); advantages: (batch,), one per trajectory."""
    adv = advantages[:, None]
    rho = torch.exp(logp - old_logp)
    surrogate = torch.minimum(rho * adv, torch.clamp(rho, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ratio = ref_logp - logp
    kl = torch.exp(log_ratio) - log_ratio - 1
    n = mask.sum().clamp(min=1)
    loss = -((surrogate - kl_coef * kl) * mask).sum() / n
    with torch.no_grad():
        clipped = ((rho - 1).abs() > clip_eps).float()
        stats = {"kl": float((kl * mask).sum() / n), "clip_fraction": float((clipped * mask).sum() / n)}
    return loss, stats


def update(policy, reference, optimizer, params, buffer, args, autocast):
    """--ppo-epochs passes over the buffer [(conversation, advantage)], one optimizer step per
    mini-batch. Returns the pass's statistics, or raises on a non-finite loss before any step."""
    buffer = sorted(buffer, key=lambda item: len(item[0]))   # similar lengths share a batch: less padding
    micro = [buffer[i:i + args.micro_batch] for i in range(0, len(buffer), args.micro_batch)]
    batches = [policy.encode([messages for messages, _ in m]) for m in micro]
    advantages = [torch.tensor([a for _, a in m], device=policy.model.device) for m in micro]
    old, ref = [], []
    policy.model.eval()
    with torch.no_grad(), autocast():
        for batch in batches:   # pi_old: the policy that sampled the buffer, before any update
            old.append(policy.token_logprobs(batch, args.temperature)[0])
        with reference():
            for batch in batches:
                ref.append(policy.token_logprobs(batch, args.temperature)[0])
    policy.model.train()
    # --minibatch counts the trajectories of an optimizer step over all ranks: each rank takes its
    # share (at least a micro-batch), and all take as many steps as the rank with the most
    # micro-batches needs (one that has run out adds nothing, but joins the gradient sum)
    per_step = max(1, args.minibatch // args.micro_batch // tools.world_size())
    n_steps = math.ceil(max(tools.all_gather(len(micro))) / per_step)
    stats, order = [], list(range(len(micro)))
    for _ in range(args.ppo_epochs):
        random.shuffle(order)
        for start in range(0, n_steps * per_step, per_step):
            chosen = order[start:start + per_step]
            # the mini-batch's tokens on every rank
            n_tokens = tools.all_reduce_sum(sum(float(batches[i]["assistant_mask"][:, 1:].sum()) for i in chosen))
            for i in chosen:
                with autocast():
                    logp, mask = policy.token_logprobs(batches[i], args.temperature)
                    loss, s = grpo_loss(logp, old[i], ref[i], advantages[i], mask, args.clip_eps, args.kl_coef)
                if not torch.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(f"the GRPO loss is {loss.item()}")
                # grpo_loss is the mean over this micro-batch's tokens; weighted by its share of
                # the mini-batch's tokens, the gradients add up to the mean over all of them, as
                # if the mini-batch were one forward pass
                (loss * float(mask.sum()) / n_tokens).backward()
                stats.append({**s, "loss": loss.item(), "tokens": float(mask.sum())})
            tools.sum_gradients(params)   # the whole mini-batch's gradient, on every rank
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            if not torch.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"the gradient norm is {norm.item()}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    keys = ("loss", "kl", "clip_fraction")   # token-weighted means over every rank's micro-batches
    *sums, total = tools.all_reduce_sum([sum(s[k] * s["tokens"] for s in stats) for k in keys]
                                        + [sum(s["tokens"] for s in stats)])
    return {k: weighted / total for k, weighted in zip(keys, sums)} | {"tokens": int(total / args.ppo_epochs)}


def lr_at(step, lr, args) -> float:
    """Linear warmup over --warmup-steps, then constant."""
    return lr * (step + 1) / args.warmup_steps if step < args.warmup_steps else lr


# ---- evaluation, logging and checkpoints --------------------------------------------------------

def standard_error(values) -> float:
    """The standard error of the mean of independent values (0 for fewer than two)."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def paired_difference(before, after) -> tuple:
    """Mean and standard error of after - before over the pairs where both are known (None: an
    episode without a judged final image has no final QE)."""
    d = [b - a for a, b in zip(before, after) if a is not None and b is not None]
    return (float(np.mean(d)) if d else 0.0), standard_error(d)


def gather_episodes(records, parts) -> tuple:
    """Every rank's episode records and reward parts, on every rank, in rank order. The records
    travel without their images and conversations (but the system prompt, which names the
    tools): the statistics read neither."""
    light = [{**{k: v for k, v in r.items() if k != "images"}, "messages": r["messages"][:1]} for r in records]
    gathered = tools.all_gather((light, parts))
    return [r for rs, _ in gathered for r in rs], [p for _, ps in gathered for p in ps]


def summarize(records, parts, prefix="") -> dict:
    """Mean, std and standard error of the reward and its components, and the episodes' rates."""
    out = {}
    for key in ("total", "task", "reflection", "behavior"):
        values = [p[key] for p in parts]
        name = "reward" if key == "total" else key
        out[f"{prefix}{name}_mean"], out[f"{prefix}{name}_std"] = float(np.mean(values)), float(np.std(values))
    out[f"{prefix}reward_se"] = standard_error([p["total"] for p in parts])
    s = tools.episode_stats(records)
    out.update({f"{prefix}final_qe": s["mean_final_score"], f"{prefix}turns": s["mean_turns"],
                f"{prefix}well_formed": s["well_formed_turns"], f"{prefix}completed": s["completed"]})
    return out


def evaluate(policy, dataset, plan, toolbox, args, temperature=0.0) -> dict:
    """Episodes on the held-out prompts, greedy unless a temperature is given (benchmarks/heldout.py).
    Besides the means it keeps each episode's reward and final QE (eval_episode_rewards,
    eval_episode_final_qe, in plan order) for paired comparisons on the same prompts."""
    # a swap: the policy plays at the evaluation's temperature while `temperature` keeps the
    # training one, which is put back below
    temperature, policy.temperature = policy.temperature, temperature
    if hasattr(policy, "model"):   # a served policy has no local model
        policy.model.eval()
    records, mine = [], tools.shard(plan)   # each rank plays its share of the prompts
    for i in range(0, len(mine), 32):
        records += tools.run_episodes(policy, [tools.make_task(dataset, p) for p in mine[i:i + 32]],
                                      toolbox, args.max_turns)
    policy.temperature = temperature
    records, parts = gather_episodes(records, score(records, args))   # in plan order: shards are contiguous
    return {**summarize(records, parts, prefix="eval_"), "eval_episode_rewards": [p["total"] for p in parts],
            "eval_episode_final_qe": [r["final_score"] for r in records]}


def qe_text(score) -> str:
    """A mean final QE score for the console (None: no episode had a judged final image)."""
    return "n/a" if score is None else f"{score:.2f}"


def paired_gain(before, after) -> dict:
    """The held-out reward and final QE of `after` minus those of `before` (the SFT policy, step
    0) on the same prompts, with the standard errors of the paired differences."""
    out = {}
    for name, key in (("reward", "eval_episode_rewards"), ("final_qe", "eval_episode_final_qe")):
        out[f"eval_{name}_gain"], out[f"eval_{name}_gain_se"] = paired_difference(before[key], after[key])
    return out


def plot_curve(metrics, path):
    """reward_curve.png: the mean training reward per step and the held-out reward, drawn with pillow."""
    W, H, pad = 640, 360, 48
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    train = [(m["step"], m["reward_mean"]) for m in metrics if "reward_mean" in m]
    held = [(m["step"], m["eval_reward_mean"]) for m in metrics if "eval_reward_mean" in m]
    values = [v for _, v in train + held] or [0.0]
    lo, hi = min(values + [0.0]), max(values + [1.0])
    last = max([s for s, _ in train + held] + [1])
    xy = lambda s, v: (pad + (W - 2 * pad) * s / last, H - pad - (H - 2 * pad) * (v - lo) / (hi - lo))  # noqa: E731
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    for v in np.linspace(lo, hi, 5):
        draw.text((4, xy(0, v)[1] - 6), f"{v:.2f}", fill="black")
    draw.text((W // 2 - 20, H - pad + 8), f"step (0-{last})", fill="black")
    if len(train) > 1:
        draw.line([xy(s, v) for s, v in train], fill=(31, 119, 180), width=2)
    for s, v in held:
        x, y = xy(s, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 127, 14))
    draw.text((pad + 8, 8), "mean reward: training (line), held-out greedy (dots)", fill="black")
    tools.write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


# ---- the run folder: settings, checkpoint and log, so that --resume continues exactly ----------

# what may change when a run is resumed; everything else must match the saved run_config.json
RESUMABLE = {"resume", "steps", "eval_every", "save_every", "device", "api_key_env", "ig_offload"}


def resume_state(out, args):
    """The checkpoint this run continues, or None for a fresh start. Refuses to overwrite a run,
    to resume a finished one, or to resume with other settings. A run killed before its first
    checkpoint saved nothing to keep: it starts over."""
    if not (out / "checkpoint.pt").is_file():
        started = (out / "metrics.jsonl").exists() or (out / "run_config.json").exists()
        if args.resume and not started:
            raise tools.UserError(f"--resume: no checkpoint.pt in {out}")
        if started:
            print(f"{out} holds no checkpoint yet: starting over")
        return None
    if not args.resume:
        raise tools.UserError(f"{out} holds a run: pass --resume to continue it, or another --out")
    tools.refuse_changed_settings(out, args, RESUMABLE)
    state = torch.load(out / "checkpoint.pt", weights_only=False, map_location="cpu")
    if state["step"] >= args.steps:
        raise tools.UserError(f"--resume: the run in {out} is finished (step {state['step']} of --steps "
                              f"{args.steps}); pass a larger --steps to train on")
    return state


def random_states() -> dict:
    """Every random state training reads: Python's (the mini-batch order), torch's and CUDA's
    (sampling). Prompts and tools draw from seeds of their own."""
    return {"python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(out, policy, optimizer, step):
    """OUT/checkpoint.pt: trainable weights, optimizer and random states, written then renamed."""
    trainable = {n: p.detach().cpu() for n, p in policy.model.named_parameters() if p.requires_grad}
    state = {"model": trainable, "optimizer": optimizer.state_dict(), "step": step, **random_states()}
    tools.write_atomic(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(state, policy, optimizer) -> int:
    """Put the trained weights, the optimizer and the random states back; returns the step."""
    policy.model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def read_metrics(path, upto) -> list:
    """The logged lines of steps up to `upto` (-1: none): a resumed run redoes the steps after its
    checkpoint, a run that starts over all of them."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [m for m in lines if m["step"] <= upto]


def main(argv=None):
    args = get_args(argv)
    tools.init_distributed(args.device)   # under torchrun; one process without it
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    state = resume_state(out, args)

    # setup: data, tools, the policy with its reference, the optimizer
    with tools.main_first():   # rank 0 may generate the toy world and measure its references; the others read them
        dataset = tools.load_dataset(args.data, args.data_root, args.size)
        toolbox = tools.make_toolbox(args, tools.parse_tools_flag(args.tools), dataset=dataset,
                                     categories=dataset.train_categories)
    pool = prompt_pool(dataset, args.seed)
    if args.prompts_per_step > len(pool):
        raise tools.UserError(f"--prompts-per-step must be at most {len(pool)} (the prompt pool of "
                              f"{dataset.name}), not {args.prompts_per_step}")
    if args.prompts_per_step < tools.world_size():
        raise tools.UserError(f"--prompts-per-step must be at least {tools.world_size()} (a group for every "
                              f"process), not {args.prompts_per_step}")
    held_out = validation_prompts(dataset, args.eval_per_type, args.seed)
    policy, reference, use_lora, lr = load_models(args)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.device.startswith("cuda") \
        else nullcontext
    start_step = 0
    if state is not None:
        start_step = load_checkpoint(state, policy, optimizer)
        print(f"resuming after step {start_step} of {args.steps}")
    metrics = read_metrics(out / "metrics.jsonl", start_step if state is not None else -1)
    tools.barrier()   # every rank has read OUT before rank 0 writes to it
    if tools.is_main():
        tools.write_json(out / "run_config.json", {**vars(args), "lr": lr})   # config.json is the model's

    def log(row):   # every rank keeps the rows (the summary compares them); rank 0 writes them
        metrics.append(row)
        if tools.is_main():
            tools.write_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
            plot_curve(metrics, out / "reward_curve.png")

    if start_step == 0:
        first = evaluate(policy, dataset, held_out, toolbox, args)
        log({"step": 0, **first})
        print(f"held-out before RL: reward {first['eval_reward_mean']:.3f} +- {first['eval_reward_se']:.3f}, "
              f"final QE {qe_text(first['eval_final_qe'])}")

    # the loop: rollout -> rewards -> advantages -> update
    bar = tqdm(range(start_step, args.steps), desc="grpo", initial=start_step, total=args.steps,
               disable=not tools.is_main())
    for step in bar:
        started = time.time()
        prompts = step_prompts(pool, args.prompts_per_step, step, args.seed)
        # each rank plays its share of the prompts, whole groups
        records = rollout(policy, dataset, tools.shard(prompts), args.group_size, toolbox, args.max_turns)
        parts = score(records, args)
        judged = [not judge_failed(r) for r in records]
        advantages, keep = grpo_advantages([p["total"] for p in parts], args.group_size, judged)
        buffer = [(r["messages"], float(a)) for r, a, k in zip(records, advantages, keep) if k]
        step_lr = lr_at(step, lr, args)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        episodes, episode_parts = gather_episodes(records, parts)   # every rank's, for the log
        row = {"step": step + 1, **summarize(episodes, episode_parts), "episodes": len(episodes),
               "groups_kept": int(tools.all_reduce_sum(int(keep.view(-1, args.group_size).any(1).sum()))),
               "judge_failed": sum(judge_failed(r) for r in episodes), "lr": step_lr}
        if row["groups_kept"]:   # some rank holds a buffer: every rank joins the update
            try:
                row.update(update(policy, reference, optimizer, params, buffer, args, autocast))
            except FloatingPointError as e:
                raise tools.UserError(f"step {step + 1}: {e}; the step is not applied and the last "
                                      f"good checkpoint ({out / 'checkpoint.pt'}) is kept; lower --lr") from None
        row["seconds"] = round(time.time() - started, 1)
        if args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row.update(evaluate(policy, dataset, held_out, toolbox, args))
            row.update(paired_gain(metrics[0], row))
            bar.write(f"step {step + 1}: held-out reward {row['eval_reward_mean']:.3f} "
                      f"({row['eval_reward_gain']:+.3f} +- {row['eval_reward_gain_se']:.3f} paired), final QE "
                      f"{qe_text(row['eval_final_qe'])} ({row['eval_final_qe_gain']:+.2f} +- {row['eval_final_qe_gain_se']:.2f}), "
                      f"completed {row['eval_completed']:.0%}")
        log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row.get('kl', 0):.4f}",
                        kept=row["groups_kept"])
        if tools.is_main() and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            save_checkpoint(out, policy, optimizer, step + 1)

    # save the trained policy as a plain model, and say what RL changed on held-out prompts
    if not tools.is_main():
        tools.leave()   # waits there while rank 0 saves
        return
    if use_lora:
        policy.model = policy.model.merge_and_unload()
    policy.save(out)
    before = next(m for m in metrics if m["step"] == 0)
    after = metrics[-1]
    summary = {k: {"before": before[k], "after": after[k]} for k in before
               if k.startswith("eval_") and not k.startswith("eval_episode_")}
    gain = summary["paired_gain"] = paired_gain(before, after)
    tools.write_json(out / "summary.json", summary)
    print(f"saved {out}. Held-out prompts (greedy): mean reward "
          f"{before['eval_reward_mean']:.3f} -> {after['eval_reward_mean']:.3f} (paired gain "
          f"{gain['eval_reward_gain']:+.3f} +- {gain['eval_reward_gain_se']:.3f}), final QE "
          f"{qe_text(before['eval_final_qe'])} -> {qe_text(after['eval_final_qe'])} ({gain['eval_final_qe_gain']:+.2f} "
          f"+- {gain['eval_final_qe_gain_se']:.2f}), completed "
          f"{before['eval_completed']:.0%} -> {after['eval_completed']:.0%}")
    tools.leave()


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
