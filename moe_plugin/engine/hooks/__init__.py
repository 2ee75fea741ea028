from .expert_parallel_hook import ExpertParallelHook
from .random_state_hook import RandomStateHook

__all__ = ['ExpertParallelHook', 'RandomStateHook']
