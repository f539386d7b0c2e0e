"""Rewards inside `sample`: the real SmolLM2 with the math ORM, every built-in ORM, and distillation."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from testing_utils import read_jsonl

from megaswift.arguments.sampling import SamplingArguments
from megaswift.pipelines.sample import sample_main
from megaswift.rewards import get_orm


@pytest.mark.slow
def test_smollm2_rejection_sampling_with_math_orm(smollm2_dir, math_file, math_rows, tmp_path):
    path = sample_main(SamplingArguments(
        model='HuggingFaceTB/SmolLM2-135M-Instruct', dataset=[f'{math_file}'], num_sampling_batch_size=5,
        num_sampling_batches=1, num_return_sequences=4, n_best_to_keep=2, orm_model='math', max_new_tokens=48,
        temperature=0.7, torch_dtype='bfloat16', system='Answer with the result of the calculation.',
        output_dir=str(tmp_path), output_file='rft.jsonl'))
    lines = read_jsonl(path)
    assert 1 <= len(lines) <= 10  # 5 prompts x at most 2 kept; SmolLM2 solves some of these sums
    math = get_orm('math')
    references = {r['messages'][-1]['content'] for r in math_rows}
    for x in lines:
        answer = x['messages'][-1]['content']
        assert math([answer], solution=[x['solution']]) == [1.0], 'a kept sample must pass the ORM'
        assert answer not in references, 'the ground truth is never a candidate'
        assert x['rejected_response'] != answer
        assert x['messages'][0] == {'role': 'system', 'content': 'Answer with the result of the calculation.'}
    per_prompt = {}
    for x in lines:
        per_prompt[x['id']] = per_prompt.get(x['id'], 0) + 1
    assert max(per_prompt.values()) <= 2


@pytest.mark.parametrize('orm', ['math', 'accuracy', 'format', 'react_format', 'cosine', 'repetition',
                                 'soft_overlong'])
def test_every_builtin_orm_runs_inside_sample(tiny_llama_dir, math_file, tmp_path, orm):
    # In ms-swift only `math` survives `swift sample`; the others crash on the calling convention.
    path = sample_main(SamplingArguments(model=tiny_llama_dir, dataset=[math_file], orm_model=orm,
                                         orm_threshold=-10.0, num_return_sequences=2, max_new_tokens=4,
                                         torch_dtype='float32', output_dir=str(tmp_path), output_file='o.jsonl'))
    meta = json.loads(open(path + '.meta.json').read())
    assert meta['stats']['samples'] == 14
    assert meta['stats']['lines'] + meta['stats']['no_passing_sample'] > 0


class ReasoningServer(BaseHTTPRequestHandler):
    """A stand-in for a hosted reasoning API (e.g. DeepSeek-R1) that returns reasoning_content."""

    def do_GET(self):
        self._send({'data': [{'id': 'teacher'}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        q = body['messages'][-1]['content']
        self._send({'model': 'teacher', 'choices': [
            {'index': i, 'finish_reason': 'stop',
             'message': {'role': 'assistant', 'content': f'answer {i} to {q}', 'reasoning_content': f'thinking {i}'}}
            for i in range(body['n'])]})

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_distill_formats_reasoning_content(math_file, tmp_path):
    srv = ThreadingHTTPServer(('127.0.0.1', 0), ReasoningServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        path = sample_main(SamplingArguments(
            sampler_type='distill', sampler_engine='client', dataset=[math_file], num_return_sequences=2,
            engine_kwargs=json.dumps({'base_url': f'http://127.0.0.1:{srv.server_address[1]}/v1'}),
            output_dir=str(tmp_path), output_file='d.jsonl'))
    finally:
        srv.shutdown()
    lines = read_jsonl(path)
    assert len(lines) == 14
    assert lines[0]['messages'][-1]['content'] == '<think>thinking 0</think>\n\n<answer>answer 0 to What is 2 + 3?</answer>'
