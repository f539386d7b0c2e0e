"""get_orm / get_prm lookups, errors, reduce_reward, and the example plugin files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megaswift.rewards import (CosineReward, MathORM, RepetitionPenalty, get_orm, get_prm, looks_like_model, orms,
                               prms, reduce_reward)

PLUGINS = Path(__file__).resolve().parents[2] / 'examples' / 'plugins'


@pytest.fixture
def clean_registries():
    saved_orms, saved_prms = dict(orms), dict(prms)
    yield
    orms.clear(), orms.update(saved_orms)
    prms.clear(), prms.update(saved_prms)


def _load_plugin(name: str):
    spec = importlib.util.spec_from_file_location(f'plugin_{name}', PLUGINS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_registry_lookup_with_kwargs():
    assert isinstance(get_orm('math'), MathORM)
    rep = get_orm('repetition', repetition_n_grams=2)
    assert isinstance(rep, RepetitionPenalty) and rep.n == 2
    assert isinstance(get_orm('cosine', cosine_max_len=10), CosineReward)
    assert set(orms) >= {'math', 'accuracy', 'format', 'react_format', 'cosine', 'repetition', 'soft_overlong'}
    assert 'client' in prms


def test_unknown_names_list_registered_and_suggest():
    with pytest.raises(ValueError, match=r"unknown ORM 'acuracy'.*format.*did you mean 'accuracy'\?"):
        get_orm('acuracy')
    with pytest.raises(ValueError, match=r"unknown PRM 'clinet'.*did you mean 'client'\?"):
        get_prm('clinet')
    with pytest.raises(ValueError) as info:
        get_orm('zzzzzz')
    assert 'did you mean' not in str(info.value) and '--external_plugins' in str(info.value)


def test_looks_like_model(tmp_path):
    assert looks_like_model(str(tmp_path)) and looks_like_model('Qwen/Qwen2.5-Math-PRM-7B')
    assert not looks_like_model('accuracy') and not looks_like_model('a/b/c') and not looks_like_model('./nope/x')


def test_missing_model_path_fails_to_resolve():
    with pytest.raises(FileNotFoundError):
        get_prm('nobody-here/not-a-model-xyz')


def test_reduce_reward():
    assert reduce_reward(0.5) == 0.5 and reduce_reward(1) == 1.0
    assert reduce_reward([0.9, 0.2, 0.7]) == 0.2 and reduce_reward((3,)) == 3.0
    with pytest.raises(ValueError, match='empty'):
        reduce_reward([])
    with pytest.raises(TypeError):
        reduce_reward(None)


def test_example_plugins_register(clean_registries):
    assert 'contains_answer' not in orms and 'length_prm' not in prms
    _load_plugin('custom_orm')
    _load_plugin('custom_prm')
    orm = get_orm('contains_answer')
    assert orm(['the answer is 42', 'no idea', 'x'], solution=['42', '42', None], messages=[None] * 3) == \
        [1.0, 0.0, 0.0]
    prm = get_prm('length_prm', target_words=4)
    scores = prm(['One two three four five.\n\nSo 4.', ''], messages=[None, None])
    assert scores == [[1.0, 0.5], [0.0]]
    assert [reduce_reward(s) for s in scores] == [0.5, 0.0]
