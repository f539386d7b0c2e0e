"""Calls of the official ``openai`` client shared by the deploy tests (their servers serve the model as 'tiny')."""
HELLO = [{'role': 'user', 'content': 'Tell me about the sea.'}]


def chat(client, **kw):
    return client.chat.completions.create(model='tiny', messages=kw.pop('messages', HELLO), **kw)


def texts(response):
    return [c.message.content for c in response.choices]


def streamed(client, **kw) -> tuple[dict, dict, dict]:
    """Per choice index: the concatenated text, the finish reason and the logprob entries of a streamed reply."""
    text, finish, logprobs = {}, {}, {}
    for chunk in chat(client, stream=True, **kw):
        assert chunk.model == 'tiny' and chunk.object == 'chat.completion.chunk'
        for c in chunk.choices:
            text[c.index] = text.get(c.index, '') + (c.delta.content or '')
            if c.finish_reason:
                finish[c.index] = c.finish_reason
            if c.logprobs and c.logprobs.content:
                logprobs.setdefault(c.index, []).extend(c.logprobs.content)
    return text, finish, logprobs
