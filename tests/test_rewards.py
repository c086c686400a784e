import math

import pytest
import torch

from cappo_pl.errors import RewardError
from cappo_pl.rewards import call_reward, resolve_reward


def test_resolve_module_and_file(tmp_path):
    fn = resolve_reward("cappo_pl.rewards:exact_match")
    assert fn(["p"], ["4 "], answer=["4"]) == [1.0]
    f = tmp_path / "my_reward.py"
    f.write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    fn = resolve_reward(f"{f}:length")
    assert fn(["a", "b"], ["xy", "z"]) == [2.0, 1.0]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nomodule_xyz:f", "cannot import"),
        ("cappo_pl.rewards:nope", "not a callable"),
        ("x.py:f", "not found"),
        ("plain", "expected"),
    ],
)
def test_resolve_errors(spec, match):
    with pytest.raises(RewardError, match=match):
        resolve_reward(spec)


def boom(prompts, completions, **kw):
    raise KeyError("target")


def test_call_reward_errors_name_function_and_sample():
    with pytest.raises(RewardError, match=r"test_rewards\.boom raised KeyError"):
        call_reward(boom, ["p"], ["c"], {})
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        call_reward(lambda p, c, **k: [1.0], ["p", "q"], ["c", "d"], {})
    with pytest.raises(RewardError, match=r"returned nan for sample 1 \(prompt 'q', completion 'd'\)"):
        call_reward(lambda p, c, **k: [1.0, math.nan], ["p", "q"], ["c", "d"], {})


def test_call_reward_skip_and_tensor():
    r, valid = call_reward(
        lambda p, c, **k: torch.tensor([1.0, math.inf, 0.5]), ["a"] * 3, ["b"] * 3, {}, on_error="skip"
    )
    assert valid.tolist() == [True, False, True] and r.tolist() == [1.0, 0.0, 0.5]
