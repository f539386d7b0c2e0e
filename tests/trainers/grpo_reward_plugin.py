"""A reward for GRPO tests (an ``--external_plugins`` file): random models' completions spread over it."""
from megaswift.rewards import ORM, orms


class VowelShare(ORM):
    """The share of vowels among the completion's letters (0 without letters)."""

    def __call__(self, completions, **columns):
        out = []
        for text in completions:
            letters = [c for c in text.lower() if c.isalpha()]
            out.append(sum(c in 'aeiou' for c in letters) / len(letters) if letters else 0.0)
        return out


orms['vowel_share'] = VowelShare
