"""Tool calls through ``megaswift deploy`` with the official ``openai`` client.

The real models at hand never call a tool, so the server here runs a model built to: a one-layer Llama whose
attention and MLP write nothing, so each next token depends only on the current one. Its embeddings and LM
head form a chain: after the chat template's last token ('\\n' of ``<|im_start|>assistant\\n``) it writes
``ANSWER`` token by token, then ``<|im_end|>``. Everything else is the real stack: the hermes agent template
renders the tools and the tool messages, the transformers engine generates, the server parses the call.
"""
import json

import openai
import pytest
import torch

# Spelled so that a bigram chain exists in SmolLM2's vocabulary ('_' is one token, needed by '<tool_call>').
ANSWER = '<tool_call>{"name":"getWeather","arguments": {"city":"Paris"}}'
TOOLS = [{'type': 'function', 'function': {
    'name': 'getWeather', 'description': 'The current weather in a city',
    'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}]
ASK = [{'role': 'user', 'content': 'What is the weather in Paris?'}]


def bigram_chain(tokenizer, text: str, first: int, last: int) -> list[int]:
    """Token ids spelling ``text`` in which every id (``first`` included) has one successor, ending in ``last``:
    a depth-first search over the ways to split ``text`` into vocabulary tokens."""
    pieces: dict[str, int] = {}
    for i in range(len(tokenizer)):
        piece = tokenizer.decode([i])
        if piece and piece in text and i not in tokenizer.all_special_ids:
            pieces.setdefault(piece, i)
    by_start = {p: sorted((s for s in pieces if text.startswith(s, p)), key=len, reverse=True)
                for p in range(len(text))}

    def search(pos: int, prev: int, succ: dict[int, int]) -> list[int] | None:
        if pos == len(text):
            return [] if succ.get(prev, last) == last else None
        for piece in by_start[pos]:
            tid = pieces[piece]
            if succ.get(prev, tid) != tid:
                continue
            added = prev not in succ
            succ[prev] = tid
            rest = search(pos + len(piece), tid, succ)
            if rest is not None:
                return [tid] + rest
            if added:
                del succ[prev]
        return None

    chain = search(0, first, {})
    assert chain is not None, f'no bigram spelling of {text!r}'
    return chain + [last]


@pytest.fixture(scope='module')
def tool_model_dir(tmp_path_factory, smollm2_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    start = tok('<|im_start|>assistant\n', add_special_tokens=False)['input_ids'][-1]
    chain = bigram_chain(tok, ANSWER, start, tok.convert_tokens_to_ids('<|im_end|>'))
    assert tok.decode(chain, skip_special_tokens=True) == ANSWER
    hidden = 64
    assert len(chain) < hidden - 1
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=chain[-1], bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, hidden - 1] = 1.0  # every token off the chain leads to <|im_end|>
        head[chain[-1], hidden - 1] = 20.0
        for slot, (tid, nxt) in enumerate(zip([start] + chain[:-1], chain)):
            emb[tid] = 0.0
            emb[tid, slot] = 1.0
            head[nxt, slot] = 20.0
    model.generation_config.eos_token_id = chain[-1]
    out = tmp_path_factory.mktemp('tool_model')
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope='module')
def client(deploy, tool_model_dir):
    url = deploy(tool_model_dir, '--served_model_name', 'tooly', '--agent_template', 'hermes')
    return openai.OpenAI(base_url=url, api_key='unused', max_retries=0, timeout=60)


def ask(client, **kw):
    return client.chat.completions.create(model='tooly', messages=kw.pop('messages', ASK), temperature=0, **kw)


def test_tool_call_is_parsed(client):
    r = ask(client, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == 'tool_calls' and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == 'function' and call.id.startswith('call_')
    assert call.function.name == 'getWeather' and json.loads(call.function.arguments) == {'city': 'Paris'}
    plain = ask(client)  # without tools the same text is an answer, and the prompt has no tool list
    assert plain.choices[0].message.content == ANSWER and plain.choices[0].message.tool_calls is None
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50


def test_tool_choice_none_leaves_the_text(client):
    r = ask(client, tools=TOOLS, tool_choice='none')
    assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == 'stop'


def test_streamed_tool_call(client):
    calls, finish, content = {}, None, ''
    for chunk in ask(client, tools=TOOLS, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ''
            finish = c.finish_reason or finish
            for t in c.delta.tool_calls or []:
                calls[t.index] = (t.function.name, json.loads(t.function.arguments))
    assert (finish, content, calls) == ('tool_calls', '', {0: ('getWeather', {'city': 'Paris'})})


def test_tool_results_go_back_to_the_model(client):
    first = ask(client, tools=TOOLS).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True),
                     {'role': 'tool', 'tool_call_id': first.tool_calls[0].id, 'content': 'sunny, 21 C'}]
    r = ask(client, tools=TOOLS, messages=history)
    before = ask(client, tools=TOOLS).usage.prompt_tokens
    assert r.usage.prompt_tokens > before + 20  # the call and its result are in the prompt
    assert r.choices[0].finish_reason == 'tool_calls'  # this model always calls; a real one would answer
    with pytest.raises(openai.BadRequestError, match='no preceding tool call'):
        ask(client, tools=TOOLS, messages=ASK + [{'role': 'tool', 'tool_call_id': 'x', 'content': 'orphan'}])
