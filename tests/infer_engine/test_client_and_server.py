"""The client engine against megaswift's own OpenAI-compatible server, over real HTTP on 127.0.0.1."""
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from megaswift.infer_engine import ClientEngine, InferRequest, RequestConfig, TransformersEngine
from megaswift.serving.openai_server import OpenAIServer
from megaswift.utils.http import HTTPStatusError


def chat(q):
    return InferRequest([{'role': 'user', 'content': q}])


@pytest.fixture(scope='module')
def engine(tiny_llama_dir):
    return TransformersEngine(tiny_llama_dir, torch_dtype='float32')


@pytest.fixture(scope='module')
def server(engine):
    srv = OpenAIServer(engine, '127.0.0.1', 0, model_name='tiny', api_key='sk-test')
    srv.start_background()
    yield srv
    srv.shutdown()


def post(url, body, key='sk-test'):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method='POST',
                                 headers={'Content-Type': 'application/json', 'Authorization': f'Bearer {key}'})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_client_equals_local_engine_greedy(server, engine):
    client = ClientEngine(base_url=server.url, api_key='sk-test')
    assert client.model_name == 'tiny'  # discovered from /v1/models
    reqs = [chat('first'), chat('second question')]
    cfg = RequestConfig(max_tokens=8, temperature=0, n=2)
    remote = client.infer(reqs, cfg)
    local = engine.infer(reqs, cfg)
    assert [[c.message.content for c in r.choices] for r in remote] == \
           [[c.message.content for c in r.choices] for r in local]
    assert all(len(r.choices) == 2 for r in remote)


def test_stream_gives_the_same_text(server):
    client = ClientEngine(base_url=server.url, api_key='sk-test')
    plain = client.infer([chat('stream')], RequestConfig(max_tokens=8, temperature=0, n=2))[0]
    streamed = client.infer([chat('stream')], RequestConfig(max_tokens=8, temperature=0, n=2, stream=True))[0]
    assert [c.message.content for c in streamed.choices] == [c.message.content for c in plain.choices]
    assert [c.finish_reason for c in streamed.choices] == [c.finish_reason for c in plain.choices]


def test_concurrent_requests_are_batched_and_all_answered(server):
    url = server.url + '/chat/completions'
    body = lambda i: {'messages': [{'role': 'user', 'content': f'q{i}'}], 'max_tokens': 4, 'temperature': 0}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: post(url, body(i)), range(8)))
    assert all(status == 200 and len(r['choices']) == 1 for status, r in results)
    alone = post(url, body(3))[1]
    assert results[3][1]['choices'][0]['message'] == alone['choices'][0]['message']  # batching changes nothing


@pytest.mark.parametrize('body, status, match', [
    ({'messages': []}, 400, 'messages'),
    ({'messages': [{'role': 'user', 'content': 'x'}], 'n': 0}, 400, 'n must be >= 1'),
    ({'messages': [{'role': 'user', 'content': 'x'}], 'model': 'gpt-9'}, 404, "model 'gpt-9' does not exist"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, match):
    code, reply = post(server.url + '/chat/completions', body)
    assert code == status and match in reply['error']['message']


def test_api_key_is_enforced(server):
    code, reply = post(server.url + '/chat/completions', {'messages': [{'role': 'user', 'content': 'x'}]}, key='bad')
    assert code == 401
    with pytest.raises(HTTPStatusError, match='401'):
        ClientEngine(base_url=server.url, api_key='wrong', max_retries=0)


def test_unreachable_server_fails_after_retries():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match='unreachable after 2 attempts'):
        ClientEngine(model='m', base_url=f'http://127.0.0.1:{port}/v1', max_retries=1,
                     retry_backoff=0.01).infer([chat('x')], RequestConfig(max_tokens=2))
