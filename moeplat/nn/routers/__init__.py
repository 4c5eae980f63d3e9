"""Routers: x_TD (and the token ids) -> RouterOutput. Each class names its paper and equations.

Token choice, learned:  TopKRouter, SwitchRouter, NoisyTopKRouter, GShardRouter, GroupLimitedRouter,
                        SigmoidBiasRouter, SinkhornRouter (balanced in training), ReinforceRouter
Expert choice:          ExpertChoiceRouter
Not learned:            HashRouter, RandomRouter

Randomness (jitter, noise, sampling) is drawn from torch's global RNG and only in training mode,
so evaluation is deterministic and a checkpointed RNG state makes a resumed run exact.
"""

from moeplat.nn.routers.balanced import (
    ExpertChoiceRouter,
    SinkhornRouter,
    expert_choice_capacity,
    expert_choice_reference,
    sinkhorn,
)
from moeplat.nn.routers.base import LinearRouter, Router, RouterOutput, chosen_weights
from moeplat.nn.routers.deepseek import GroupLimitedRouter, SigmoidBiasRouter, group_limit
from moeplat.nn.routers.fixed import HashRouter, RandomRouter
from moeplat.nn.routers.reinforce import ReinforceRouter, sampled_logprob
from moeplat.nn.routers.softmax import GShardRouter, NoisyTopKRouter, SwitchRouter, TopKRouter

__all__ = [
    "ExpertChoiceRouter",
    "GShardRouter",
    "GroupLimitedRouter",
    "HashRouter",
    "LinearRouter",
    "NoisyTopKRouter",
    "RandomRouter",
    "ReinforceRouter",
    "Router",
    "RouterOutput",
    "SigmoidBiasRouter",
    "SinkhornRouter",
    "SwitchRouter",
    "TopKRouter",
    "chosen_weights",
    "expert_choice_capacity",
    "expert_choice_reference",
    "group_limit",
    "sampled_logprob",
    "sinkhorn",
]
