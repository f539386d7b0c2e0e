"""utils.registry: the one dict + decorator + unknown-name error every plugin kind uses."""
import pickle

import pytest

from megaswift.utils.errors import UserError
from megaswift.utils.registry import DuplicatePluginError, Registry, UnknownPluginError, did_you_mean


def test_register_as_decorator_and_call_and_plain_dict():
    reg = Registry('widget')

    @reg.register('a')
    class A:
        pass

    def b():
        pass

    assert reg.register('b')(b) is b
    reg['c'] = int  # plugins may still assign directly
    assert isinstance(reg, dict) and reg == {'a': A, 'b': b, 'c': int}
    assert reg.register()(len) is len and reg['len'] is len  # name defaults to __name__
    assert reg.get('missing') is None  # dict.get is untouched


def test_duplicate_names_need_overwrite():
    reg = Registry('widget', {'a': int})
    reg.register('a')(int)  # the same object again (a module imported twice) is fine
    with pytest.raises(DuplicatePluginError, match=r"widget 'a' is already registered.*overwrite=True"):
        reg.register('a')(float)
    reg.register('a', overwrite=True)(float)
    assert reg['a'] is float


def test_lookup_error_names_flag_closest_and_known():
    reg = Registry('reward function', {'accuracy': 1, 'format': 2})
    assert reg.lookup('format') == 2
    with pytest.raises(UnknownPluginError) as info:
        reg.lookup('acuracy', '--orm')
    err = info.value
    assert isinstance(err, UserError) and isinstance(err, ValueError) and not isinstance(err, KeyError)
    assert str(err) == ("--orm: unknown reward function 'acuracy' (known: accuracy, format); "
                        "did you mean 'accuracy'? More can be registered with --external_plugins.")
    assert (err.kind, err.name, err.flag, err.known) == ('reward function', 'acuracy', '--orm', ['accuracy', 'format'])
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
    with pytest.raises(UnknownPluginError, match=r"^unknown x 'zzz' \(known: none\)$"):
        Registry('x', hint='').lookup('zzz')


def test_did_you_mean():
    assert did_you_mean('vlm', ['vllm', 'sglang']) == "; did you mean 'vllm'?"
    assert did_you_mean('zzzz', ['vllm']) == ''
    assert did_you_mean(3, [1, 2, 3]) == "; did you mean '3'?"
