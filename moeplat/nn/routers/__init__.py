"""Routers: x_TD (and the token ids) -> RouterOutput. Each class names its paper and equations.

Token choice, learned:  TopKRouter (optionally with null experts), SwitchRouter, NoisyTopKRouter,
                        GShardRouter, GroupLimitedRouter, SigmoidBiasRouter, SinkhornRouter
                        (balanced in training), ReinforceRouter
Dynamic (1..K experts): TopPRouter
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
from moeplat.nn.routers.base import (
    LinearRouter,
    NullRoute,
    Router,
    RouterOutput,
    chosen_weights,
    without_null_experts,
)
from moeplat.nn.routers.deepseek import GroupLimitedRouter, SigmoidBiasRouter, group_limit
from moeplat.nn.routers.dynamic import TopPRouter, top_p_choice, top_p_reference
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
    "NullRoute",
    "RandomRouter",
    "ReinforceRouter",
    "Router",
    "RouterOutput",
    "SigmoidBiasRouter",
    "SinkhornRouter",
    "SwitchRouter",
    "TopKRouter",
    "TopPRouter",
    "chosen_weights",
    "expert_choice_capacity",
    "expert_choice_reference",
    "group_limit",
    "sampled_logprob",
    "sinkhorn",
    "top_p_choice",
    "top_p_reference",
    "without_null_experts",
]
