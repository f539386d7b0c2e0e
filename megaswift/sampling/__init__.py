from .prompts import Prompt, build_prompt, output_row
from .sampler import Sampler, shard_bounds
from .selection import Candidate, Selection, select

__all__ = ['Prompt', 'build_prompt', 'output_row', 'Sampler', 'shard_bounds', 'Candidate', 'Selection', 'select']
