"""ClientPRM against a real OpenAI-style HTTP server on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megaswift.rewards import ClientPRM, get_prm
from megaswift.rewards.prm import parse_score


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.active = self.peak = self.fail_first = 0
        self.requests: list[dict] = []


def _reply(conversation: list[dict]):
    """The content the fake reward server answers with, computed from the request."""
    content = conversation[-1]['content']
    if content.startswith('BAD'):
        return 'I think it is good'
    if content.startswith('STEPS'):
        return json.dumps([len(s) / 10 for s in content.split('\n\n')])
    return str(len(content) + len(conversation))


@pytest.fixture
def server():
    state = _State()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
            with state.lock:
                state.requests.append({'path': self.path, 'auth': self.headers.get('Authorization'), **body})
                state.active += 1
                state.peak = max(state.peak, state.active)
                fail = state.fail_first > 0
                state.fail_first -= fail
            time.sleep(0.2)
            with state.lock:
                state.active -= 1
            if fail:
                self.send_error(503, 'warming up')
                return
            data = json.dumps({'choices': [{'message': {'role': 'assistant',
                                                        'content': _reply(body['messages'])}}]}).encode()
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/v1', state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_parallel_scores_in_order(server):
    url, state = server
    prm = get_prm('client', base_url=url, api_key='sk-test', model='rm', max_workers=8)
    completions = [f'answer {"x" * i}' for i in range(8)]
    messages = [[{'role': 'user', 'content': 'q'}]] * 8
    start = time.monotonic()
    scores = prm(completions, messages=messages, solution=[None] * 8)
    elapsed = time.monotonic() - start
    assert scores == [float(len(c) + 2) for c in completions]
    assert state.peak >= 4 and elapsed < 1.2  # 8 x 0.2 s sequentially would be 1.6 s
    req = state.requests[0]
    assert req['path'] == '/v1/chat/completions' and req['auth'] == 'Bearer sk-test' and req['model'] == 'rm'
    assert req['messages'][0] == {'role': 'user', 'content': 'q'} and req['messages'][-1]['role'] == 'assistant'


def test_per_step_list_and_no_messages(server, monkeypatch):
    url, state = server
    monkeypatch.setenv('MEGASWIFT_PRM_BASE_URL', url)
    prm = ClientPRM()
    assert prm(['STEPS\n\nabcdefghij\n\nabcde', 'abc']) == [[0.5, 1.0, 0.5], 4.0]
    assert 'model' not in state.requests[0]
    assert prm([]) == []


def test_bad_content_raises_with_content_and_url(server):
    url, _ = server
    prm = ClientPRM(base_url=url)
    with pytest.raises(ValueError, match=r"127\.0\.0\.1.*'I think it is good'"):
        prm(['fine', 'BAD one'])


def test_server_errors_are_retried(server):
    url, state = server
    state.fail_first = 2
    assert ClientPRM(base_url=url, retry_backoff=0.01)(['ab']) == [3.0]
    assert len(state.requests) == 3


def test_connection_refused_after_retries(monkeypatch):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    sleeps = []
    monkeypatch.setattr('megaswift.utils.http.time.sleep', sleeps.append)
    prm = ClientPRM(base_url=f'http://127.0.0.1:{port}/v1/', retry_backoff=0.01, timeout=5)
    with pytest.raises(ConnectionError, match=r'unreachable after 4 attempts'):
        prm(['x'])
    assert sleeps == pytest.approx([0.01, 0.02, 0.04])


def test_missing_base_url_names_env_var_and_flag(monkeypatch):
    monkeypatch.delenv('MEGASWIFT_PRM_BASE_URL', raising=False)
    with pytest.raises(ValueError, match=r'MEGASWIFT_PRM_BASE_URL.*--prm_kwargs'):
        ClientPRM()


@pytest.mark.parametrize('content, expected', [('0.5', 0.5), (' 3 ', 3.0), ('[1, 0.25]', [1.0, 0.25]), (2, 2.0)])
def test_parse_score(content, expected):
    assert parse_score(content, 'u') == expected


@pytest.mark.parametrize('content', ['', 'yes', '[]', '["a"]', 'true', 'NaN', '{"score": 1}', None])
def test_parse_score_rejects(content):
    with pytest.raises(ValueError, match='reward server u replied'):
        parse_score(content, 'u')
