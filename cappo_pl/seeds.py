"""Every random stream of a run, named in one place: ``derive_seed(seed, stream, *keys)``.

A run has one seed (``model.seed``; ``data.seed`` for the prompt order). Each consumer of randomness
takes its own named stream, keyed by where it is in the run (step, rank, ...), so a resumed run
redraws exactly what the uninterrupted one drew. A new consumer adds a stream here rather than an
ad-hoc formula of its own. Two things draw outside these streams: Lightning's ``seed_everything``
seeds the global RNG (LoRA's adapter initialisation draws from it), and ``sft_init`` / ``sft_batches``
are both the SFT seed itself (one seeds the global RNG, the other a generator: kept so, for the
cached SFT checkpoints).

The formulas are the ones the streams had before they were gathered here (a seeded run gives the
same samples as before), which is why they are not one hash. Within the ranges a run uses (steps
< 1,000,003, ranks < 97, generation batches < 1,009, samples per prompt < 1,031) distinct keys of
one stream give distinct seeds. The seed of each stream is its own config's (``model.seed``,
``data.seed``, ``sft.seed``, ...):

| stream           | keys                         | consumer                                         |
|------------------|------------------------------|--------------------------------------------------|
| rollout          | step, gen_batch, rank        | ``torch.multinomial`` draws of a training step    |
| minibatch_order  | step, rank                   | PPO epochs' mini-batch permutations              |
| validation       | batch, rank                  | validation sampling                              |
| rollout_row      | step, gen_batch, place, g    | per-completion streams (``seed_per_prompt``)     |
| srr_references   | (none)                       | SRR reference completions sampled from the SFT policy |
| clip_cov         | content                      | Clip-Cov's random pick (a hash of the mini-batch) |
| prompt_order     | pass                         | the shuffle of the training prompts, per pass    |
| extra_prompts    | step, gen_batch              | DAPO's extra generation batches' prompts         |
| model_init       | (none)                       | the built-in tiny model's initial weights (``init_seed``) |
| sft_init         | (none)                       | the global torch RNG while SFT trains (``sft.seed``) |
| sft_batches      | (none)                       | SFT's batch order                                |
| sft_eval         | split (0 train, 1 val)       | SFT's sampled-accuracy check                     |
| pcgrad_order     | (none)                       | PCGrad's projection order (the combiner's ``seed``) |
| task_build       | (none)                       | the built-in task's reference picks and split (``data.task.seed``) |
| hidden_target    | prompt                       | hidden-target subsets (prompt: crc32 of its text) |
| train_eval_prompts | (none)                   | the training prompts ``train_eval/*`` scores      |
| path_graph       | (none)                       | PathTask's random DAG (``data.task.seed``)        |
| path_references  | (none)                       | PathTask's Zipf-skewed reference paths            |
| path_split       | (none)                       | PathTask's held-out pair order                    |
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_P = 1_000_003  # the stream-local step multiplier (a prime above any step count)
_EXTRA = 2**32  # extra generation batches of a step live in their own step range


def _per_rank(salt: int) -> Callable[[int, int, int], int]:
    # ``* 7 + salt`` keeps the three per-rank streams apart (salts 0..2; >= 7 would alias the next rank)
    return lambda seed, step, rank: ((seed * _P + step) * 97 + rank) * 7 + salt


def _rollout(seed: int, step: int, gen_batch: int, rank: int) -> int:
    return _per_rank(0)(seed, step + gen_batch * _EXTRA, rank)


def _rollout_row(seed: int, step: int, gen_batch: int, place: int, sample: int) -> int:
    return (((seed * _P + step) * 1_009 + gen_batch) * _P + place) * 1_031 + sample


STREAMS: dict[str, Callable[..., int]] = {
    "rollout": _rollout,
    "minibatch_order": _per_rank(1),
    "validation": _per_rank(2),
    "rollout_row": _rollout_row,
    "srr_references": lambda seed: seed + 7,
    "clip_cov": lambda seed, content: seed * _P + content,
    "prompt_order": lambda seed, pass_id: seed * _P + pass_id,
    "extra_prompts": lambda seed, step, gen_batch: (seed * _P + step) * 1009 + gen_batch,
    "model_init": lambda seed: seed,
    "sft_init": lambda seed: seed,
    "sft_batches": lambda seed: seed,
    "sft_eval": lambda seed, split: seed + split,
    "pcgrad_order": lambda seed: seed,
    "task_build": lambda seed: seed,
    "hidden_target": lambda seed, prompt: seed * _P + prompt,  # prompt: a crc32
    "train_eval_prompts": lambda seed: seed * _P + 4,
    "path_graph": lambda seed: seed * _P + 1,
    "path_references": lambda seed: seed * _P + 2,
    "path_split": lambda seed: seed * _P + 3,
}


def derive_seed(seed: int, stream: str, *keys: int) -> int:
    """The seed of ``stream`` at ``keys`` (module docstring lists the streams and their keys).

    Raises:
        KeyError: an unknown stream (a new consumer must add its stream to ``STREAMS``).

    """
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; known: {sorted(STREAMS)}")
    return STREAMS[stream](seed, *keys)


def generator(seed: int, stream: str, *keys: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, stream, *keys)``."""
    gen = torch.Generator(device=device) if device is not None else torch.Generator()
    return gen.manual_seed(derive_seed(seed, stream, *keys))
