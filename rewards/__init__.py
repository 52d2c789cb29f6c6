"""r1pipe.rewards: reward functions for GRPO (spec section 3) and the machinery to call them safely.

A reward is TRL's `f(prompts, completions, **columns) -> list[float | None]`. Recipes name rewards
(`load_reward`, `parse_reward_specs`); `RewardRunner` scores batches, isolating failures and
timeouts; `run_in_sandbox` runs model-written code. The built-ins load on the first name lookup.
"""

from .registry import RewardSpec, available_rewards, load_reward, parse_reward_specs, register
from .runner import NONE_POLICIES, RewardOutput, RewardRunner, combine_rewards
from .sandbox import SandboxLimits, SandboxResult, run_in_sandbox

__all__ = [
    "NONE_POLICIES",
    "RewardOutput",
    "RewardRunner",
    "RewardSpec",
    "SandboxLimits",
    "SandboxResult",
    "available_rewards",
    "combine_rewards",
    "load_reward",
    "parse_reward_specs",
    "register",
    "run_in_sandbox",
]
