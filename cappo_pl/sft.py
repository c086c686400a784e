"""SFT warm start of the built-in model on the data's reference completions, cached by config hash.

The checkpoint folder is written with ``save_pretrained`` (model and tokenizer) plus
``sft_metrics.json`` (the SFT policy's accuracy), into a temporary folder renamed into place, so an
interrupted run never leaves a half-written cache entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from cappo_pl.data.records import Record, reward_fields, source_file
from cappo_pl.errors import DataError
from cappo_pl.models import SFTConfig, TinyModelConfig, build_char_tokenizer, build_tiny_model
from cappo_pl.rewards.base import RewardFn, call_reward
from cappo_pl.rollout import RolloutConfig, sample
from cappo_pl.seeds import derive_seed, generator


def sft_cache_key(tiny: TinyModelConfig, sft: SFTConfig, records: list[Record]) -> str:
    """Hash of everything that determines the SFT weights (not the cache location)."""
    payload = {
        "tiny": dataclasses.asdict(tiny),
        "sft": {k: v for k, v in dataclasses.asdict(sft).items() if k not in ("cache_dir", "eval_samples")},
        "data": [(r.prompt, r.references) for r in records],
        "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _examples(records: list[Record], tokenizer) -> list[tuple[list[int], int]]:
    out = []
    for rec in records:
        prompt = tokenizer(rec.prompt)["input_ids"]
        for ref in rec.references:
            comp = tokenizer(ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append((prompt + comp, len(prompt)))
    return out


def _collate(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, plen) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, plen : len(seq)] = ids[i, plen : len(seq)]  # loss on the completion (and EOS) only
    return ids, attn, labels


@torch.no_grad()
def sampled_accuracy(
    model, tokenizer, records: list[Record], reward: RewardFn, samples: int, seed: int = 0, max_new_tokens: int = 16
) -> float:
    """Mean reward of ``samples`` completions per prompt at temperature 1 (the RL start policy)."""
    if not records:
        return float("nan")
    enc = tokenizer([r.prompt for r in records], padding=True, padding_side="left", return_tensors="pt")
    cfg = RolloutConfig(group_size=samples, max_new_tokens=max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    ro = sample(
        model, enc["input_ids"], enc["attention_mask"], cfg, tokenizer.eos_token_id, tokenizer.pad_token_id, gen
    )
    texts = tokenizer.batch_decode(ro.completion_ids, skip_special_tokens=True)
    prompts = [r.prompt for r in records for _ in range(samples)]
    rewards, _ = call_reward(reward, prompts, texts, reward_fields(records, samples))
    return float(rewards.mean())


def train_sft(tiny: TinyModelConfig, sft: SFTConfig, train: list[Record], log=print):
    """Train the tiny model on ``train``'s references; returns ``(model, tokenizer)``."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tiny, tokenizer)
    examples = _examples(train, tokenizer)
    if not examples:
        where = source_file(train[0].source) if train else "the training data"
        raise DataError(f"{where}: the SFT warm start needs reference completions (field 'references'), none found")
    gen = generator(sft.seed, "sft_batches")
    opt = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < sft.warmup_steps:
            return (step + 1) / sft.warmup_steps
        progress = (step - sft.warmup_steps) / max(1, sft.steps - sft.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    for step in range(sft.steps):
        idx = torch.randint(len(examples), (sft.batch_size,), generator=gen).tolist()
        ids, attn, labels = _collate([examples[i] for i in idx], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == sft.steps - 1:
            log(f"[sft] step {step:5d}/{sft.steps}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)")
    model.eval()
    return model, tokenizer


def ensure_sft_checkpoint(
    tiny: TinyModelConfig,
    sft: SFTConfig,
    train: list[Record],
    val: list[Record],
    reward: RewardFn,
    log=print,
    eval_train: list[Record] | None = None,
) -> Path:
    """Return the folder of the SFT checkpoint for this config, training it if it is not cached.

    ``train`` is what SFT trains on; the reported train accuracy is on ``eval_train`` (default ``train``):
    the RL training prompts, where a task's SFT data holds more (``PathTask``'s 1-hop edges).
    """
    folder = Path(sft.cache_dir) / sft_cache_key(tiny, sft, train)
    if (folder / "sft_metrics.json").is_file() and (folder / "config.json").is_file():
        metrics = json.loads((folder / "sft_metrics.json").read_text())
        log(
            f"[sft] cached checkpoint {folder} "
            f"(train accuracy {metrics['train_accuracy']:.3f}, val {metrics['val_accuracy']:.3f})"
        )
        return folder
    log(f"[sft] training the built-in model on {sum(len(r.references) for r in train)} references -> {folder}")
    torch.manual_seed(derive_seed(sft.seed, "sft_init"))
    model, tokenizer = train_sft(tiny, sft, train, log)
    n, seed = sft.eval_samples, sft.seed
    # room for the longest reference + EOS (PathTask's paths are 17 characters); 16 as before for short ones
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for r in train for ref in r.references)
    budget = max(16, longest + 2)
    metrics = {
        "train_accuracy": sampled_accuracy(
            model, tokenizer, eval_train or train, reward, n, derive_seed(seed, "sft_eval", 0), budget
        ),
        "val_accuracy": sampled_accuracy(model, tokenizer, val, reward, n, derive_seed(seed, "sft_eval", 1), budget),
        "samples_per_prompt": sft.eval_samples,
    }
    tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    tmp.mkdir(parents=True)
    # Under torch.distributed, transformers writes model files on global rank 0 only; but every node's
    # local rank 0 prepares its own (possibly node-local) cache, so this process must write them itself.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "sft_metrics.json").write_text(json.dumps(metrics, indent=2))
    if (folder / "config.json").is_file():  # a concurrent writer won; keep theirs
        shutil.rmtree(tmp)
    else:
        if folder.exists():  # an incomplete folder (e.g. written without weights): replace it
            shutil.rmtree(folder)
        tmp.rename(folder)
    log(
        f"[sft] SFT policy accuracy: train {metrics['train_accuracy']:.3f}, val {metrics['val_accuracy']:.3f} "
        f"({sft.eval_samples} samples/prompt, T=1)"
    )
    return folder
