"""megaswift: Megatron-style LLM post-training."""
__version__ = '0.1.0'
