"""
sft.py -- supervised fine-tuning of the policy on structured trajectories (docs/METHOD.md section 5).

    python build_trajectories.py && python sft.py        # toy world, tiny Qwen3-VL built from config
    python build_trajectories.py --data visa --data-root /data/VisA && \\
        python sft.py --data visa --data-root /data/VisA --policy Qwen/Qwen3-VL-4B-Thinking   # the paper's setting

Next-token loss on the assistant turns only (thinking, tool calls, answer, each turn's end token);
system prompt, user message and tool observations are context. The tokens that spell the task's
anomaly type weigh --type-weight times the others, so the policy learns to read the type from the
task rather than guess it from the item (docs/METHOD.md section 5). The vision encoder is frozen, its
projector and the language model train (fully, or with LoRA: the default above 1B parameters).
AdamW with a cosine schedule after warmup, gradient accumulation, gradient clipping, bf16 autocast
on GPU, validation loss every --eval-every steps, a checkpoint every --save-every steps (--resume
continues from it exactly, with the same settings). At the end it saves the model to OUT (load it
with --policy OUT in synthesize.py and rl.py), removes the checkpoint it supersedes, and plays a
short rollout evaluation on --data's evaluation categories: the share of well-formed turns and of
completed episodes (answer after mask).

It trains on trajectories built from --data (default folder runs/trajectories/<data>), and stops
before training when there are none, or when their manifest.json says they come from another
dataset or another --data-root.

Several processes (`torchrun --nproc_per_node N sft.py ...`, README) train as one: every rank
draws the same order and renamings, takes its contiguous share of each step's batch and runs it
through DistributedDataParallel. The step's loss stays the mean over all the batch's assistant
tokens: each rank multiplies its summed loss by the number of ranks and divides it by the global
token count (an all_reduce); DDP averages the gradients over the ranks, which divides the factor
out again, so the update is the one a single process makes on the whole batch. Rank 0 logs, saves
and plays the rollout evaluation; the ranks share out the validation loss.

Simplifies: one conversation's images are encoded at the processor's fixed size; sequences are
not packed.
"""
import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import tools


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default="toy", help="the dataset the trajectories were built from, and of the "
                      "final rollout evaluation: toy, mvtec, visa")
    data.add_argument("--data-root", default=None, help="its folder")
    data.add_argument("--trajectories", default=None, help="folder with train.jsonl, val.jsonl and manifest.json "
                      "(default: runs/trajectories/<data>)")
    data.add_argument("--size", type=int, default=None, help="image side in pixels (toy 128, real 256)")
    model = p.add_argument_group("model")
    model.add_argument("--policy", default="tiny", help="tiny (built from config) or a model folder / Hugging Face id")
    model.add_argument("--lora", default="auto", choices=["auto", "on", "off"], help="LoRA adapters (auto: models over 1B)")
    model.add_argument("--lora-rank", type=int, default=16, help="LoRA rank")
    model.add_argument("--train-vision", action="store_true", help="also train the vision encoder")
    model.add_argument("--rename-prob", type=float, default=0.5,
                       help="chance a trajectory's item is renamed to a made-up name, so the policy "
                            "learns to copy the item from the task instead of memorizing it")
    model.add_argument("--type-weight", type=float, default=5,
                       help="loss weight of the tokens that spell the task's anomaly type (1: plain next-token loss)")
    optim = p.add_argument_group("optimization")
    optim.add_argument("--epochs", type=float, default=5, help="passes over the training trajectories (paper: 3)")
    optim.add_argument("--lr", type=float, default=None, help="peak learning rate (tiny: 1e-3; paper: 1e-5)")
    optim.add_argument("--batch-size", type=int, default=2, help="trajectories per optimizer step")
    optim.add_argument("--micro-batch", type=int, default=2, help="trajectories per forward pass")
    optim.add_argument("--warmup", type=float, default=0.05, help="share of steps for linear warmup")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/sft", help="output folder: the model, checkpoint/, metrics.jsonl")
    run.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    run.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    run.add_argument("--rollouts", type=int, default=2, help="episodes per (category, type) in the final evaluation (0: none)")
    run.add_argument("--max-turns", type=int, default=10, help="turns per evaluation episode")
    run.add_argument("--max-new-tokens", type=int, default=384, help="longest assistant turn in the evaluation")
    run.add_argument("--seed", type=int, default=0, help="seed of initialization, order and sampling")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    tools.add_backend_flags(p)   # the final rollout evaluation's tools
    args = p.parse_args(argv)
    check_flags(args)
    return args


def check_flags(args) -> None:
    """Every numeric flag against its meaning: a bad value stops the run here, in one line."""
    def require(ok, flag, allowed):
        if not ok:
            raise tools.UserError(f"--{flag} must be {allowed}, not {getattr(args, flag.replace('-', '_'))}")
    for flag in ("batch-size", "micro-batch", "eval-every", "save-every", "max-turns", "max-new-tokens", "lora-rank"):
        require(getattr(args, flag.replace("-", "_")) >= 1, flag, "at least 1")
    require(args.rollouts >= 0, "rollouts", "at least 0 (0: no rollout evaluation)")
    for flag in ("epochs", "lr", "grad-clip", "type-weight"):
        value = getattr(args, flag.replace("-", "_"))
        require(value is None or value > 0, flag, "above 0")
    for flag in ("warmup", "rename-prob"):
        require(0 <= getattr(args, flag.replace("-", "_")) <= 1, flag, "between 0 and 1")
    require(args.weight_decay >= 0, "weight-decay", "at least 0")


def build_command(args) -> str:
    return " ".join(["python build_trajectories.py --data", args.data]
                    + (["--data-root", str(args.data_root)] if args.data_root else [])
                    + ["--out", f"runs/trajectories/{args.data}"])


def check_trajectories(folder, args):
    """The trajectories exist and their manifest names --data; the dataset is loaded (so --data and
    --data-root are checked) and must be the one they were built from. Before any training."""
    if not (folder / "train.jsonl").is_file():
        raise tools.UserError(f"no trajectories in {folder}: build them first with: {build_command(args)}")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise tools.UserError(f"{folder} has no manifest.json, so its dataset is unknown; build "
                              f"trajectories of --data {args.data} with: {build_command(args)}") from None
    except ValueError:
        raise tools.UserError(f"{folder / 'manifest.json'} is corrupt; build trajectories again with: "
                              f"{build_command(args)}") from None
    if manifest.get("dataset") != args.data:
        raise tools.UserError(f"{folder} holds trajectories of {manifest.get('dataset')}, not of --data "
                              f"{args.data}; build those with: {build_command(args)}")
    dataset = tools.load_dataset(args.data, args.data_root, args.size)
    if manifest.get("root") != str(dataset.root.resolve()):
        raise tools.UserError(f"{folder} was built from {manifest.get('root')}, not from --data-root "
                              f"{dataset.root.resolve()}; build trajectories of it with: {build_command(args)}")
    return dataset


def read_trajectories(path) -> list:
    if not path.is_file():
        raise tools.UserError(f"{path} not found: run build_trajectories.py first")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise tools.UserError(f"{path}:{n} is not valid JSON") from None
        if not isinstance(record, dict) or not {"messages", "images"} <= set(record):
            raise tools.UserError(f"{path}:{n} is not a trajectory (no messages and images): "
                                  "rebuild it with build_trajectories.py")
        # images by path, relative to the file's folder (the policy's image_root)
        records.append({**record, "messages": tools.live_conversation(record["messages"], record["images"])})
    if not records:
        raise tools.UserError(f"{path} holds no trajectories: run build_trajectories.py first")
    return records


def made_up_name(rng):
    """A pronounceable name that is no real object's ("pufidax", "nukavu totas"). A list of real names
    would only be memorized; names the policy has never seen can only be copied from the task."""
    def word():
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))) \
            + rng.choice(["", "", "n", "r", "s", "x"])
    return " ".join(word() for _ in range(1 if rng.random() < 0.8 else 2))


def rename_item(record, name):
    """The trajectory with its item called name everywhere (task, thinking, arguments, prompts)."""
    pattern = re.compile(rf"\b{re.escape(record['category'].replace('_', ' '))}\b")
    messages = []
    for m in record["messages"]:
        if m["role"] == "system":
            messages.append(m)
        elif isinstance(m["content"], str):
            messages.append({**m, "content": pattern.sub(name, m["content"])})
        else:
            messages.append({**m, "content": [{**part, "text": pattern.sub(name, part["text"])}
                                              if part["type"] == "text" else part for part in m["content"]]})
    return {**record, "messages": messages}


def assistant_loss(policy, batch, weights=None):
    """Summed negative log-likelihood of the assistant tokens (each times its weight, if given), and
    how many there are."""
    logp, mask = policy.token_logprobs(batch)
    return -(logp * mask * (1 if weights is None else weights.to(logp.device))).sum(), mask.sum()


def type_weights(policy, batch, records, weight):
    """Loss weights aligned with token_logprobs: `weight` on the tokens that spell each record's
    anomaly type, 1 elsewhere (only the assistant's count, by the mask; why: docs/METHOD.md 5)."""
    targets = batch["input_ids"][:, 1:].tolist()
    weights = torch.ones(len(targets), len(targets[0]))
    for row, (tokens, record) in enumerate(zip(targets, records)):
        word = record["anomaly_type"].replace("_", " ")
        for spelling in {tuple(policy.tokenizer(text, add_special_tokens=False)["input_ids"])
                         for text in (word, " " + word)}:
            n = len(spelling)
            for t in range(len(tokens) - n + 1):
                if tuple(tokens[t:t + n]) == spelling:
                    weights[row, t:t + n] = weight
    return weights


def validation_loss(policy, records, micro_batch, autocast):
    """The mean loss per assistant token; each rank scores its share of the records."""
    policy.model.eval()
    records = tools.shard(records)
    total, count = 0.0, 0.0
    with torch.no_grad(), autocast():
        for i in range(0, len(records), micro_batch):
            loss, n = assistant_loss(policy, policy.encode([r["messages"] for r in records[i:i + micro_batch]]))
            total, count = total + loss.item(), count + n.item()
    policy.model.train()
    total, count = tools.all_reduce_sum([total, count])
    return total / max(count, 1)


def prepare_model(policy, args):
    """Freeze the vision encoder (its projector trains), optionally wrap the LLM in LoRA."""
    n_params = sum(p.numel() for p in policy.model.parameters())
    use_lora = policy.make_trainable(args.lora, args.lora_rank, args.train_vision)
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    print(f"model: {n_params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained"
          f"{' (LoRA)' if use_lora else ''}")
    return use_lora


def check_batch(args, n_train) -> None:
    """Every step's batch is --batch-size trajectories (never more than the training set), and
    splits evenly over the ranks, which run the same number of micro-batches in step."""
    if args.batch_size > n_train:
        raise tools.UserError(f"--batch-size must be at most {n_train} (the training trajectories), "
                              f"not {args.batch_size}")
    if args.batch_size % tools.world_size():
        raise tools.UserError(f"--batch-size must be a multiple of the {tools.world_size()} processes, "
                              f"not {args.batch_size}")


def warmup_cosine(step, warmup, total) -> float:
    """The learning rate's share of its peak at a step: linear warmup over `warmup` steps, then a
    cosine decay to 0 at step `total`."""
    return min(1.0, (step + 1) / max(warmup, 1)) * (
        0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - warmup) / max(1, total - warmup)))))


def rollout_evaluation(policy, args, dataset):
    """Greedy episodes on the evaluation categories, through the shared runner."""
    plan = tools.plan_tasks(dataset, per_type=args.rollouts, seed=args.seed)
    policy.model.eval()
    policy.temperature = 0.0   # greedy: the policy's best guess at every turn
    policy.max_new_tokens = args.max_new_tokens
    records, toolbox = [], tools.make_toolbox(args, dataset=dataset, categories=dataset.eval_categories)
    for i in tqdm(range(0, len(plan), 16), desc="rollout evaluation"):
        tasks = [tools.make_task(dataset, t) for t in plan[i:i + 16]]
        records += tools.run_episodes(policy, tasks, toolbox, args.max_turns)
    return tools.episode_stats(records)


# ---- the run folder: settings, checkpoint and log, so that --resume continues exactly ----------

# what may change when a run is resumed; everything else must match the saved run_config.json
RESUMABLE = {"resume", "eval_every", "save_every", "device", "api_key_env", "ig_offload"}


def resumes_checkpoint(out, args) -> bool:
    """Whether this run resumes OUT's checkpoint. Refuses to overwrite a model or a checkpoint,
    to resume a finished run, or to resume with other settings. A run killed before its first
    checkpoint saved nothing to keep: it starts over."""
    checkpoint = out / "checkpoint" / "training_state.pt"
    if (out / "config.json").exists() and not checkpoint.exists():
        raise tools.UserError(f"the run in {out} is finished (its model is saved); pass another --out"
                              if args.resume else f"{out} already holds a model; pass another --out")
    if not checkpoint.exists():
        if args.resume and not (out / "run_config.json").exists():
            raise tools.UserError(f"--resume: no checkpoint in {out}")
        if (out / "run_config.json").exists():
            print(f"{out} holds no checkpoint yet: starting over")
        return False
    if not args.resume:
        raise tools.UserError(f"{out} holds a checkpoint: pass --resume to continue it, or another --out")
    tools.refuse_changed_settings(out, args, RESUMABLE)
    return True


def random_states(order_rng) -> dict:
    """Every random state training reads: Python's, numpy's, torch's (and CUDA's), and the
    generator that orders the trajectories and picks which to rename."""
    return {"python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
            "torch_rng": torch.get_rng_state(), "order_rng": order_rng.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(out, policy, optimizer, scheduler, step, use_lora, order_rng):
    """OUT/checkpoint, written beside and renamed over the last one, so a kill never loses both."""
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    try:
        shutil.rmtree(tmp, ignore_errors=True)   # what a kill left mid-save
        policy.save(tmp) if not use_lora else policy.model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        policy.image_processor.save_pretrained(tmp)
        torch.save({"model": policy.model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, **random_states(order_rng)},
                   tmp / "training_state.pt")
        if final.exists():
            old = out / "checkpoint.old"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except OSError as e:
        raise tools.UserError(f"cannot write the checkpoint {final}: {e.strerror or e}") from None


def load_checkpoint(out, policy, optimizer, scheduler, order_rng) -> int:
    """Put the model, the optimizer, the schedule and every random state back; returns the step."""
    state = torch.load(out / "checkpoint" / "training_state.pt", weights_only=False, map_location="cpu")
    policy.model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    order_rng.setstate(state["order_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def remove_checkpoint(out) -> None:
    """The final model supersedes the checkpoint; without training_state.pt the run counts as
    finished, so that file goes first."""
    (out / "checkpoint" / "training_state.pt").unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)


def cut_metrics(path, upto) -> None:
    """Keep the log's lines of steps up to `upto` (-1: none): a resumed run redoes the steps after
    its checkpoint, a run that starts over all of them. A line a kill cut short goes too."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= upto:
                kept.append(line + "\n")
        except ValueError:
            pass
    tools.write_atomic(path, "".join(kept))


def append_metrics(path, row) -> None:
    """One line per step, on disk as soon as the step ends."""
    try:
        with open(path, "a") as log:
            log.write(json.dumps(row) + "\n")
    except OSError as e:
        raise tools.UserError(f"cannot write {path}: {e.strerror or e}") from None


def main(argv=None):
    args = get_args(argv)
    tools.init_distributed(args.device)   # under torchrun; one process without it
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    folder = Path(args.trajectories or f"runs/trajectories/{args.data}")
    with tools.main_first():   # rank 0 may generate the toy world, the others then read it
        dataset = check_trajectories(folder, args)
    train = read_trajectories(folder / "train.jsonl")
    check_batch(args, len(train))
    has_val = (folder / "val.jsonl").is_file() and (folder / "val.jsonl").stat().st_size > 0
    val = read_trajectories(folder / "val.jsonl") if has_val else train[:8]   # tiny runs have no val split
    resuming = resumes_checkpoint(out, args)

    # setup: the policy, its trainable parameters, the optimizer, the schedule and the order
    if args.policy == "tiny":
        texts = [m["content"] if isinstance(m["content"], str) else tools.message_text(m)
                 for r in train for m in r["messages"]]
        task_words = {r[key].replace("_", " ") for r in train for key in ("category", "anomaly_type")}
        policy = tools.tiny_policy(texts, image_side=args.size or 128, seed=args.seed, words=task_words)
        lr = args.lr or 1e-3
    else:
        policy = tools.VLMPolicy.load(args.policy, device=args.device)
        lr = args.lr or 1e-5
    policy.image_root = folder
    policy.model.to(args.device).train()
    use_lora = prepare_model(policy, args)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    total_steps = max(1, math.ceil(args.epochs * len(train) / args.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup=int(args.warmup * total_steps), total=total_steps))
    # each step takes the next batch_size trajectories of a per-epoch shuffled order; the same
    # generator then picks which to rename, so the checkpoint keeps its state (and every rank,
    # drawing for the whole batch, stays in step with the others)
    order, rng = [], random.Random(args.seed)
    for _ in range(math.ceil(args.epochs) + 1):
        epoch = list(range(len(train)))
        rng.shuffle(epoch)
        order += epoch
    step = 0
    if resuming:
        step = load_checkpoint(out, policy, optimizer, scheduler, rng)
        print(f"resuming from step {step} of {total_steps}")
    model = tools.data_parallel(policy.model)   # several processes: DDP; one: the model itself
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.device.startswith("cuda") \
        else (lambda: torch.autocast("cpu", enabled=False))
    log = out / "metrics.jsonl"
    tools.barrier()   # every rank has read OUT before rank 0 writes to it
    if tools.is_main():
        tools.write_json(out / "run_config.json", {**vars(args), "lr": lr})   # config.json is the model's
        cut_metrics(log, step if resuming else -1)

    # the loop
    if step == 0:
        first = validation_loss(policy, val, args.micro_batch, autocast)
        if tools.is_main():
            append_metrics(log, {"step": 0, "val_loss": first})
        print(f"step 0: validation loss {first:.3f}")
    bar = tqdm(range(step, total_steps), desc="sft", initial=step, total=total_steps, disable=not tools.is_main())
    start = time.time()
    for step in bar:
        chosen = [train[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        chosen = [rename_item(r, made_up_name(rng)) if rng.random() < args.rename_prob else r for r in chosen]
        mine = tools.shard(chosen)   # this rank's share of the batch
        groups = [mine[i:i + args.micro_batch] for i in range(0, len(mine), args.micro_batch)]
        batches = [policy.encode([r["messages"] for r in group]) for group in groups]
        # the step's loss is a mean over all its assistant tokens (each times its type weight),
        # however they fall into micro-batches and ranks
        n_tokens = tools.all_reduce_sum(sum(int(b["assistant_mask"][:, 1:].sum()) for b in batches))
        step_loss = 0.0
        for k, batch in enumerate(batches):
            # DDP averages the ranks' gradients in the last micro-batch's backward: times the
            # world size, the average of the ranks' shares is their sum
            with tools.data_parallel_pass(policy, model, sync=k == len(batches) - 1):
                with autocast():
                    loss, _ = assistant_loss(policy, batch, type_weights(policy, batch, groups[k], args.type_weight))
                (loss * tools.world_size() / n_tokens).backward()
            step_loss += loss.item() / n_tokens
        step_loss = tools.all_reduce_sum(step_loss)
        if not math.isfinite(step_loss):
            raise tools.UserError(f"step {step + 1}: the loss is {step_loss}; lower --lr (the last "
                                  "checkpoint is kept)")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        row = {"step": step + 1, "loss": step_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
               "seconds": round(time.time() - start, 1)}
        if (step + 1) % args.eval_every == 0 or step + 1 == total_steps:
            row["val_loss"] = validation_loss(policy, val, args.micro_batch, autocast)
            bar.write(f"step {step + 1}: validation loss {row['val_loss']:.3f}")
        if tools.is_main():
            append_metrics(log, row)
            if (step + 1) % args.save_every == 0 and step + 1 < total_steps:
                save_checkpoint(out, policy, optimizer, scheduler, step + 1, use_lora, rng)

    # save the final model (LoRA merged in, so every stage loads a plain model) and evaluate it
    if not tools.is_main():
        tools.leave()   # waits there while rank 0 saves and evaluates
        return
    if use_lora:
        policy.model = policy.model.merge_and_unload()
    policy.save(out)
    remove_checkpoint(out)
    if args.rollouts:
        stats = rollout_evaluation(policy, args, dataset)
        tools.write_json(out / "rollout_eval.json", stats)
        print(f"saved {out}. Rollout evaluation on {args.data}'s evaluation categories: "
              + tools.format_stats(stats))
    else:
        print(f"saved {out}.")
    tools.leave()


if __name__ == "__main__":
    try:
        main()
    except tools.UserError as e:
        sys.exit(f"error: {e}")
