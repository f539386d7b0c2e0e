"""How ``megaswift deploy`` shares its engine between clients, on one real server process with small batches
(``--max_batch_size 4``: a request of n=64 is 16 pieces): a large ``n`` does not starve the others, a long prompt
does not shorten the answers batched with it, equal seeded requests get equal answers however they are batched,
and requests over a cap are refused while normal ones are served. Its API key comes from $MEGASWIFT_API_KEY.
Orders of completion are asserted, never durations."""
import http.client
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from chat_helpers import HELLO, chat, streamed, texts  # noqa: E402

KEY = 'sk-from-env'
ALMOST_FULL = [{'role': 'user', 'content': 'sea ' * 1990}]  # 2021 tokens: 27 of the tiny model's 2048 positions left


@pytest.fixture(scope='module')
def url(deploy, tiny_llama_dir):
    return deploy(tiny_llama_dir, '--served_model_name', 'tiny', '--max_batch_size', '4', '--max_n', '64',
                  '--max_concurrency', '24', env={'MEGASWIFT_API_KEY': KEY})


@pytest.fixture(scope='module')
def client(url):
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)


def test_the_api_key_comes_from_the_environment(url, raw_http):
    assert raw_http('GET', url + '/models')[0] == 401
    assert raw_http('GET', url + '/models', key=KEY)[0] == 200


def test_the_api_key_flag_wins_over_the_environment(monkeypatch):
    from megaswift.arguments.deploy import DeployArguments
    from megaswift.arguments.rollout import RolloutArguments
    monkeypatch.setenv('MEGASWIFT_API_KEY', 'sk-env')
    assert DeployArguments(model='m').api_key == RolloutArguments(model='m').api_key == 'sk-env'
    assert DeployArguments(model='m', api_key='sk-flag').api_key == 'sk-flag'


def test_an_open_host_without_a_key_is_warned_about(run_cli, caplog):
    """The warning comes before the model loads (a missing model then ends the run); a key or a loopback host
    silences it."""
    bare = run_cli(['deploy', '--model', '/nonexistent/model', '--host', '0.0.0.0', '--port', '0'], check=False,
                   env={'MEGASWIFT_API_KEY': ''}, timeout=120)
    assert 'WARNING' in bare.stderr and 'listening on 0.0.0.0 without an API key' in bare.stderr, bare.stderr
    from megaswift.serving.app import bind
    for host, key in (('0.0.0.0', KEY), ('127.0.0.1', None)):
        bind(host, 0, key).close()
    assert 'without an API key' not in caplog.text


@pytest.mark.parametrize('stream', [False, True], ids=['whole', 'streamed'])
def test_a_request_of_large_n_does_not_starve_the_others(client, stream):
    """n=64 is decoded 4 sequences at a time, taking turns with the other requests: a normal request sent while
    it runs is answered first (before, it waited for all 64)."""
    finished = []

    def large_n():
        reply = chat(client, n=64, max_tokens=8, temperature=1.0, stream=stream)
        count = len({c.index for chunk in reply for c in chunk.choices}) if stream else len(reply.choices)
        finished.append(('n=64', count))

    thread = threading.Thread(target=large_n)
    thread.start()
    time.sleep(0.2)  # the n=64 request reaches the server first
    finished.append(('normal', len(chat(client, max_tokens=4).choices)))
    thread.join()
    assert finished == [('normal', 1), ('n=64', 64)]


def _behind_a_busy_engine(client, *requests: dict) -> list:
    """The replies to ``requests``, sent together while a longer request holds the engine, so that they queue up
    and leave in one cycle."""
    with ThreadPoolExecutor(1 + len(requests)) as pool:
        busy = pool.submit(chat, client, max_tokens=40, temperature=0)
        time.sleep(0.2)
        replies = [pool.submit(chat, client, **kw) for kw in requests]
        busy.result()
        return [r.result() for r in replies]


def test_a_long_prompt_does_not_shorten_the_answers_batched_with_it(client):
    alone = chat(client, max_tokens=48, temperature=0)
    assert alone.usage.completion_tokens == 48
    long, normal = _behind_a_busy_engine(client, dict(messages=ALMOST_FULL, max_tokens=48, temperature=0),
                                         dict(max_tokens=48, temperature=0))
    assert long.usage.completion_tokens == 2048 - long.usage.prompt_tokens  # as far as the context goes
    assert (texts(normal), normal.usage.completion_tokens) == (texts(alone), 48)  # before: 27, the long one's room


def test_equal_seeded_requests_get_the_same_answer_however_they_are_batched(client):
    alone = texts(chat(client, max_tokens=8, temperature=1.0, seed=7))
    equal = _behind_a_busy_engine(client, *[dict(max_tokens=8, temperature=1.0, seed=7)] * 3)
    assert [texts(r) for r in equal] == [alone] * 3


def test_more_choices_than_a_batch_are_merged_in_order_and_streamed_alike(client):
    whole = chat(client, n=6, max_tokens=6, temperature=1.0, seed=3)
    assert [c.index for c in whole.choices] == list(range(6)) and len(set(texts(whole))) > 1
    assert whole.usage.prompt_tokens == chat(client, max_tokens=1).usage.prompt_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    text, finish, _ = streamed(client, n=6, max_tokens=6, temperature=1.0, seed=3)
    assert [text[i] for i in range(6)] == texts(whole)
    assert [finish[i] for i in range(6)] == [c.finish_reason for c in whole.choices]


def test_n_1000_and_huge_bodies_are_refused_while_16_normal_requests_are_answered(url, raw_http):
    """The issue's check: the refusals come back before the last of 16 concurrent normal requests is answered."""
    events = []

    def normal(i):
        status, reply = raw_http('POST', url + '/chat/completions',
                                 {'messages': [{'role': 'user', 'content': f'question {i}'}], 'max_tokens': 16}, KEY)
        events.append(('normal', status, len(reply.get('choices', []))))

    def n_1000():
        status, reply = raw_http('POST', url + '/chat/completions', {'messages': HELLO, 'n': 1000}, KEY)
        events.append(('n=1000', status, reply['error']['param']))

    def huge_body():
        address = urllib.parse.urlparse(url)
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        conn.putrequest('POST', '/v1/chat/completions')
        for name, value in (('Content-Length', str(10 ** 12)), ('Authorization', f'Bearer {KEY}')):
            conn.putheader(name, value)
        conn.endheaders(b'{"messages": [')
        events.append(('10^12 bytes', conn.getresponse().status, None))

    with ThreadPoolExecutor(18) as pool:
        futures = [pool.submit(normal, i) for i in range(16)] + [pool.submit(n_1000), pool.submit(huge_body)]
        for future in futures:
            future.result()
    assert events[-1][0] == 'normal', events  # both refusals came back while normal requests were still running
    assert sorted(events) == sorted([('normal', 200, 1)] * 16 + [('n=1000', 400, 'n'), ('10^12 bytes', 413, None)])
