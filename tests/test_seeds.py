import itertools

import pytest
import torch

from cappo_pl.seeds import STREAMS, derive_seed, generator


def test_streams_keep_the_seeds_runs_had_before_they_were_gathered():
    # pinned: a seeded run samples what it sampled before the refit (bench/same_run.py checks whole runs)
    assert derive_seed(3, "rollout", 5, 0, 1) == ((3 * 1_000_003 + 5) * 97 + 1) * 7
    assert derive_seed(3, "rollout", 5, 2, 1) == ((3 * 1_000_003 + 5 + 2 * 2**32) * 97 + 1) * 7
    assert derive_seed(3, "minibatch_order", 5, 1) == ((3 * 1_000_003 + 5) * 97 + 1) * 7 + 1
    assert derive_seed(3, "validation", 5, 1) == ((3 * 1_000_003 + 5) * 97 + 1) * 7 + 2
    row = (((3 * 1_000_003 + 5) * 1_009 + 1) * 1_000_003 + 9) * 1_031 + 2
    assert derive_seed(3, "rollout_row", 5, 1, 9, 2) == row
    assert derive_seed(3, "srr_references") == 10
    assert derive_seed(3, "prompt_order", 4) == 3 * 1_000_003 + 4
    assert derive_seed(3, "extra_prompts", 5, 2) == (3 * 1_000_003 + 5) * 1009 + 2


def test_keys_within_a_stream_never_collide():
    for stream, keys in {
        "rollout": itertools.product(range(40), range(3), range(4)),
        "minibatch_order": itertools.product(range(200), range(8)),
        "validation": itertools.product(range(200), range(8)),
        "rollout_row": itertools.product(range(6), range(3), range(16), range(8)),
        "prompt_order": [(p,) for p in range(500)],
    }.items():
        keys = list(keys)
        assert len({derive_seed(7, stream, *k) for k in keys}) == len(keys), stream


def test_the_per_rank_streams_of_one_step_are_apart():
    seeds = [derive_seed(0, s, step, rank) for s in ("minibatch_order", "validation") for step in range(50)
             for rank in range(8)]  # fmt: skip
    seeds += [derive_seed(0, "rollout", step, 0, rank) for step in range(50) for rank in range(8)]
    assert len(set(seeds)) == len(seeds)


def test_unknown_stream_is_refused_and_generator_is_seeded():
    with pytest.raises(KeyError, match="unknown random stream 'nope'"):
        derive_seed(0, "nope")
    a = torch.rand(4, generator=generator(1, "validation", 2, 0))
    b = torch.rand(4, generator=torch.Generator().manual_seed(derive_seed(1, "validation", 2, 0)))
    assert torch.equal(a, b)
    assert "rollout" in STREAMS and "clip_cov" in STREAMS
