"""Reward functions and the resolver for ``class_path`` / ``module:function`` / ``file.py:function``."""

from cappo_pl.rewards.base import RewardFunction, call_reward, resolve_reward
from cappo_pl.rewards.builtin import exact_match, parse_sum, sum_reward

__all__ = ["RewardFunction", "call_reward", "exact_match", "parse_sum", "resolve_reward", "sum_reward"]
