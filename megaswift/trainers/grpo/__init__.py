"""GRPO (``megaswift rlhf --rlhf_type grpo``): losses, advantages, rewards, rollout sources and the step driver.
The loss the model trains with is ``trainers/objectives/grpo.py``."""
