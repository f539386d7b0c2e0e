"""Example ``--external_plugins`` file: a custom (toy) process reward.

    megaswift sample ... --external_plugins examples/plugins/custom_prm.py --prm_model length_prm

Importing this file registers ``prms['length_prm']``. A PRM may return, per completion, one
float or a list of per-step floats; the sampler reduces a list to its minimum.
"""
from megaswift.rewards import PRM, prms


class LengthPRM(PRM):
    """Scores each blank-line-separated step by its length: ``min(1, words / target_words)``.

    A toy rule: very short steps ("So 4.") score low, steps of ``target_words`` words or more score 1.
    """

    def __init__(self, target_words: int = 8):
        self.target_words = target_words

    def __call__(self, completions, **kwargs):
        scores = []
        for completion in completions:
            steps = [s for s in completion.split('\n\n') if s.strip()] or ['']
            scores.append([min(1.0, len(s.split()) / self.target_words) for s in steps])
        return scores


prms['length_prm'] = LengthPRM
