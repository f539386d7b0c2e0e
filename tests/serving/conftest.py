"""``megaswift deploy`` as a real process on 127.0.0.1, one per test module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def deploy(tmp_path_factory):
    """``deploy(model_dir, *flags, env=None) -> base_url`` (``http://127.0.0.1:PORT/v1``; ``env``: variables added
    to the server's environment); the servers stop with the module."""
    procs = []

    def start(model_dir: str, *flags: str, env: dict | None = None) -> str:
        log = tmp_path_factory.mktemp('deploy') / 'stderr.log'
        server_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
                          PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env or {}))
        with open(log, 'w') as err:
            proc = subprocess.Popen([sys.executable, '-m', 'megaswift.cli.main', 'deploy', '--model', model_dir,
                                     '--port', '0', '--torch_dtype', 'float32', *flags],
                                    env=server_env, stdout=subprocess.PIPE, stderr=err, text=True)
        procs.append(proc)
        line = proc.stdout.readline()  # printed once the socket listens
        if ' at http://' not in line:
            proc.kill()
            pytest.fail(f'megaswift deploy did not start: {line!r}\n{log.read_text()[-4000:]}')
        return line.split(' at ')[1].strip()

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()


def http(method: str, url: str, body: bytes | dict | None = None, key: str | None = None,
         headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON reply) of one raw HTTP request; 4xx/5xx replies are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {key}'} if key else {}),
            **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope='session')
def raw_http():
    return http
