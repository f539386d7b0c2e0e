"""``megaswift deploy`` (FastAPI + uvicorn) driven by the official ``openai`` client, by raw HTTP for the requests
a client library would refuse to send, and by megaswift's own client engine. One real server process serves the
module: the tiny random Llama of tests/conftest.py on the transformers engine, with small caps."""
import json
import socket
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from megaswift.infer_engine import ClientEngine, InferRequest, RequestConfig, TransformersEngine
from megaswift.utils.http import HTTPStatusError

from chat_helpers import HELLO, chat, streamed, texts  # noqa: E402

KEY = 'sk-test'
MAX_BYTES = 65536
TOO_LONG = [{'role': 'user', 'content': 'sea ' * 3000}]  # more tokens than the tiny model's 2048 positions
IMAGE = [{'role': 'user', 'content': [{'type': 'image_url'}]}]


@pytest.fixture(scope='module')
def url(deploy, tiny_llama_dir):
    return deploy(tiny_llama_dir, '--served_model_name', 'tiny', '--api_key', KEY, '--max_request_bytes',
                  str(MAX_BYTES), '--max_n', '8', '--max_tokens_cap', '256', '--max_concurrency', '8')


@pytest.fixture(scope='module')
def client(url):
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope='module')
def engine(tiny_llama_dir):
    return TransformersEngine(tiny_llama_dir, torch_dtype='float32')


# ------------------------------------------------------------------ the openai client
def test_chat_completion_and_models(client):
    assert [m.id for m in client.models.list()] == ['tiny']
    r = chat(client, max_tokens=6, temperature=0)
    assert r.model == 'tiny' and r.object == 'chat.completion' and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == 'assistant' and isinstance(choice.message.content, str)
    assert choice.finish_reason in ('stop', 'length') and choice.message.tool_calls is None
    assert r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_n_choices(client):
    r = chat(client, max_tokens=5, temperature=1.0, n=3, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len(set(texts(r))) > 1  # three samples, not one copied


@pytest.mark.parametrize('sampling', [dict(temperature=0), dict(temperature=1.0, seed=5)])
def test_stream_equals_the_whole_answer(client, sampling):
    whole = chat(client, max_tokens=8, n=2, **sampling)
    text, finish, _ = streamed(client, max_tokens=8, n=2, **sampling)
    assert [text[i] for i in range(2)] == texts(whole)
    assert [finish[i] for i in range(2)] == [c.finish_reason for c in whole.choices]


def test_seed_reproduces_samples(client):
    runs = [texts(chat(client, max_tokens=8, temperature=1.0, n=2, seed=s)) for s in (11, 11, 12)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_logprobs_and_top_logprobs(client):
    r = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert ''.join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, pytest.approx(e.logprob))  # greedy
        assert bytes(e.bytes).decode() == e.token
    _, _, streamed_logprobs = streamed(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    assert [(e.token, e.logprob) for e in streamed_logprobs[0]] == [(e.token, e.logprob) for e in entries]
    assert chat(client, max_tokens=2).choices[0].logprobs is None


def test_text_parts_are_joined_and_a_vanishing_temperature_is_greedy(client):
    parts = [{'role': 'user', 'content': [{'type': 'text', 'text': 'Tell me '}, {'type': 'text', 'text': 'about '},
                                          {'type': 'text', 'text': 'the sea.'}]}]
    greedy = texts(chat(client, max_tokens=6, temperature=0))
    assert texts(chat(client, messages=parts, max_tokens=6, temperature=0)) == greedy
    assert texts(chat(client, max_tokens=6, temperature=1e-300)) == greedy  # not inf logits: a 500 before


def test_wrong_api_key_is_401(url):
    bad = openai.OpenAI(base_url=url, api_key='sk-wrong', max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        chat(bad, max_tokens=2)
    assert e.value.status_code == 401 and 'API key' in e.value.body['message']
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_client_side_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError, match='--max_n'):
        chat(client, n=10 ** 4)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-9' does not exist"):
        client.chat.completions.create(model='gpt-9', messages=HELLO)


# ------------------------------------------------------------------ raw HTTP: every bad request fails alone
def _ok(url, raw_http):
    status, reply = raw_http('POST', url + '/chat/completions', {'messages': HELLO, 'max_tokens': 2}, KEY)
    assert status == 200 and len(reply['choices']) == 1, reply


BAD = [
    (b'{"messages": [', 400, 'not valid JSON', None),
    (b'\xff\xfe', 400, 'not valid JSON', None),
    ({'model': 'tiny'}, 400, "'messages' is required", 'messages'),
    ({'messages': []}, 400, 'messages', 'messages'),
    ([1, 2], 400, 'JSON object', None),
    ({'messages': HELLO, 'n': 10 ** 4}, 400, "'n' is 10000", 'n'),
    ({'messages': HELLO, 'n': 0}, 400, 'greater than or equal to 1', 'n'),
    ({'messages': HELLO, 'max_tokens': 10 ** 9}, 400, "'max_tokens' is 1000000000", 'max_tokens'),
    ({'messages': HELLO, 'temperature': 'hot'}, 400, 'temperature', 'temperature'),
    ({'messages': HELLO, 'top_logprobs': 2}, 400, 'logprobs', 'top_logprobs'),
    ({'messages': HELLO, 'tool_choice': 'required', 'tools': []}, 400, 'tool_choice', 'tool_choice'),
    ({'messages': IMAGE}, 400, 'only text', 'messages.0.content.0.type'),
    ({'messages': TOO_LONG, 'max_tokens': 4}, 400, 'leaves no room to generate', None),
    ({'messages': TOO_LONG, 'max_tokens': 4, 'stream': True}, 400, 'leaves no room to generate', None),
    ({'messages': HELLO, 'model': 'gpt-9'}, 404, "model 'gpt-9' does not exist", 'model'),
    ({'messages': [{'role': 'banana', 'content': 'hi'}]}, 400, "Input should be 'system'", 'messages.0.role'),
    (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}', 400, 'finite number',
     'repetition_penalty'),
    ({'messages': HELLO, 'repetition_penalty': 1e-300}, 400, 'greater than or equal to 0.01', 'repetition_penalty'),
    (b'[' * 20000 + b']' * 20000, 400, 'nested too deeply', None),
    (b'{"messages": [], "n": ' + b'9' * 5000 + b'}', 400, 'not valid JSON', None),
    ({'messages': [{'role': 'user', 'content': 'x' * MAX_BYTES}]}, 413, 'larger than the limit of 65536', None),
]


@pytest.mark.parametrize('body, status, match, param', BAD, ids=[
    'malformed-json', 'not-utf8', 'missing-messages', 'empty-messages', 'not-an-object', 'n-1e4', 'n-0',
    'max-tokens-1e9', 'bad-type', 'top-logprobs-alone', 'tool-choice-required', 'image-part', 'prompt-too-long',
    'prompt-too-long-streamed', 'unknown-model', 'unknown-role', 'repetition-penalty-inf',
    'repetition-penalty-1e-300', 'nested-20000-deep', 'int-of-5000-digits', 'body-over-limit'])
def test_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(url, raw_http, body, status, match, param):
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    code, reply = raw_http('POST', url + '/chat/completions', data, KEY)
    assert code == status, reply
    error = reply['error']
    assert match in error['message'] and error['param'] == param
    assert set(error) == {'message', 'type', 'param', 'code'} and error['type']
    _ok(url, raw_http)


def test_unknown_routes_methods_and_chunked_bodies(url, raw_http):
    assert raw_http('GET', url + '/nothing', key=KEY)[0] == 404
    assert raw_http('GET', url + '/chat/completions', key=KEY)[0] == 405
    status, reply = raw_http('GET', url.removesuffix('/v1') + '/health')  # no key needed
    assert (status, reply) == (200, {'status': 'ok'})
    # a body without Content-Length is counted while it is read
    import http.client
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request('POST', '/v1/chat/completions', body=iter([b'x' * 40000] * 3), encode_chunked=True,
                 headers={'Authorization': f'Bearer {KEY}'})
    reply = conn.getresponse()
    assert reply.status == 413 and 'larger than the limit' in json.loads(reply.read())['error']['message']
    _ok(url, raw_http)


def test_a_bad_request_batched_with_good_ones_fails_alone(url, raw_http):
    bodies = [{'messages': TOO_LONG if i == 2 else HELLO, 'max_tokens': 4, 'temperature': 0} for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        codes = list(pool.map(lambda b: raw_http('POST', url + '/chat/completions', b, KEY)[0], bodies))
    assert codes == [200, 200, 400, 200, 200]


def test_concurrency_cap_answers_429_then_serves_again(url, raw_http):
    body = {'messages': HELLO, 'max_tokens': 48, 'temperature': 0}
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: raw_http('POST', url + '/chat/completions', body, KEY), range(20)))
    codes = sorted(code for code, _ in results)
    assert set(codes) <= {200, 429} and codes.count(200) >= 8 and 429 in codes, codes
    busy = next(reply for code, reply in results if code == 429)['error']
    assert '--max_concurrency 8' in busy['message'] and busy['type'] == 'rate_limit_error'
    _ok(url, raw_http)
    # the client engine (megaswift sample) backs off and retries a 429: all 20 are answered
    client = ClientEngine(base_url=url, api_key=KEY, max_workers=20, max_retries=8, retry_backoff=0.05)
    answers = client.infer([_req(f'q{i}') for i in range(20)], RequestConfig(max_tokens=48, temperature=0))
    assert all(len(r.choices) == 1 for r in answers)


# ------------------------------------------------------------------ megaswift's client engine (megaswift sample)
def _req(q):
    return InferRequest([{'role': 'user', 'content': q}])


def test_client_engine_equals_local_engine(url, engine):
    client = ClientEngine(base_url=url, api_key=KEY)
    assert client.model_name == 'tiny'  # discovered from /v1/models
    reqs = [_req('first'), _req('second question')]
    for cfg in (RequestConfig(max_tokens=8, temperature=0, n=2), RequestConfig(max_tokens=8, temperature=1, seed=3)):
        local = [[c.message.content for c in r.choices] for r in engine.infer(reqs, cfg)]
        assert [[c.message.content for c in r.choices] for r in client.infer(reqs, cfg)] == local
        cfg.stream = True
        assert [[c.message.content for c in r.choices] for r in client.infer(reqs, cfg)] == local


def test_concurrent_requests_are_batched_and_all_answered(url, raw_http):
    body = lambda i: {'messages': [{'role': 'user', 'content': f'q{i}'}], 'max_tokens': 4, 'temperature': 0}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: raw_http('POST', url + '/chat/completions', body(i), KEY), range(8)))
    assert all(status == 200 and len(r['choices']) == 1 for status, r in results)
    alone = raw_http('POST', url + '/chat/completions', body(3), KEY)[1]
    assert results[3][1]['choices'][0]['message'] == alone['choices'][0]['message']  # batching changes nothing


def test_client_engine_sees_4xx_at_once(url):
    with pytest.raises(HTTPStatusError, match='401'):
        ClientEngine(base_url=url, api_key='wrong', max_retries=0)
    with pytest.raises(HTTPStatusError, match='400.*--max_tokens_cap'):
        ClientEngine(base_url=url, api_key=KEY).infer([_req('x')], RequestConfig(max_tokens=10 ** 6))


def test_a_port_in_use_fails_before_the_model_loads(url, run_cli):
    port = urllib.parse.urlparse(url).port
    r = run_cli(['deploy', '--model', '/nonexistent/model', '--port', port], check=False, timeout=120)
    assert r.returncode == 1 and f'cannot listen on 127.0.0.1:{port}' in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize('flags, match', [
    (dict(max_n=0), '--max_n must be >= 1'), (dict(request_timeout=-1), '--request_timeout must be >= 0'),
    (dict(agent_template='hermez'), "--agent_template: unknown 'hermez'")])
def test_deploy_flags_are_checked(flags, match):
    from megaswift.arguments.deploy import DeployArguments
    from megaswift.utils.errors import ArgumentError
    with pytest.raises(ArgumentError, match=match):
        DeployArguments(model='m', **flags)
    assert DeployArguments(model='m').limits().max_request_bytes == 8 * 1024 * 1024


def test_unreachable_server_fails_after_retries():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match='unreachable after 2 attempts'):
        ClientEngine(model='m', base_url=f'http://127.0.0.1:{port}/v1', max_retries=1,
                     retry_backoff=0.01).infer([_req('x')], RequestConfig(max_tokens=2))


def test_request_timeout_answers_503_and_the_server_recovers(deploy, tiny_llama_dir, raw_http):
    """--request_timeout over HTTP: a generation that outlives it gets a 503 JSON error (code 'timeout') at about
    the timeout, not when the engine finishes; once the engine is free the same server answers again."""
    import time
    url = deploy(tiny_llama_dir, '--request_timeout', '0.5', '--max_tokens_cap', '4000')
    start = time.monotonic()
    status, reply = raw_http('POST', url + '/chat/completions', {'messages': HELLO, 'max_tokens': 4000})
    waited = time.monotonic() - start
    assert status == 503 and reply['error']['code'] == 'timeout', reply
    assert 'request_timeout' in reply['error']['message'] and waited < 30, (reply, waited)
    for _ in range(120):  # the abandoned generation still holds the engine for a while; then it serves again
        status, reply = raw_http('POST', url + '/chat/completions', {'messages': HELLO, 'max_tokens': 2})
        if status == 200:
            break
        assert status == 503, reply
        time.sleep(0.5)
    assert status == 200 and len(reply['choices']) == 1, reply
