"""Generation with plain transformers: batched across prompts, left-padded, N samples from one prefill."""
from __future__ import annotations

import logging
from itertools import groupby

import torch

from ..model import load_causal_lm
from .base import InferEngine
from .decoding import decode, row_generators
from .protocol import (ChatCompletionChoice, ChatCompletionResponse, ChatMessage, ChoiceLogprobs, InferRequest,
                       RequestConfig, TokenLogprob, TopLogprob, UsageInfo)

logger = logging.getLogger(__name__)

# Roles of megaswift's agent format that HF chat templates do not know.
_ROLE_FOR_TEMPLATE = {'tool_call': 'assistant', 'tool_response': 'tool'}


class TransformersEngine(InferEngine):
    """``max_batch_size`` bounds the sequences decoded together (prompts x n)."""
    supports_logprobs = True

    def __init__(self, model: str, torch_dtype: str | None = 'auto', device: str | None = None,
                 max_batch_size: int = 64, model_name: str | None = None):
        self.model, self.tokenizer, self.model_dir = load_causal_lm(model, torch_dtype, device)
        self.device = next(self.model.parameters()).device
        self.max_batch_size = max_batch_size
        self.model_name = model_name or model
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.stop_token_ids = sorted({*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None})
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        self.max_length = getattr(self.model.config, 'max_position_embeddings', None)

    # ---------------------------------------------------------------- prompts
    def encode_prompt(self, request: InferRequest) -> list[int]:
        messages = [{**m, 'role': _ROLE_FOR_TEMPLATE.get(m['role'], m['role'])} for m in request.messages]
        text = self.tokenizer.apply_chat_template(messages, tools=request.tools, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)['input_ids']

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _max_new_tokens(self, cfg: RequestConfig, prompt_len: int) -> int:
        """New tokens a batch whose longest prompt has ``prompt_len`` tokens gets (``ValueError`` when none)."""
        limit = cfg.max_tokens or 2048
        if self.max_length:
            limit = min(limit, self.max_length - prompt_len)
        if limit < 1:
            raise ValueError(f'prompt of {prompt_len} tokens leaves no room to generate '
                             f'(model max length {self.max_length})')
        return limit

    # ---------------------------------------------------------------- infer
    def infer(self, requests: list[InferRequest], request_config: RequestConfig) -> list[ChatCompletionResponse]:
        cfg = request_config
        prompts = [self.encode_prompt(r) for r in requests]
        rooms = [self._max_new_tokens(cfg, len(p)) for p in prompts]  # no room for one: ValueError, nothing decoded
        per_batch = max(1, self.max_batch_size // cfg.n)
        # Sorted by length, so each batch pads little; a batch decodes only as far as its longest prompt leaves
        # room, so only prompts left the same room share one (sorted, they are runs). Results keep request order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[ChatCompletionResponse | None] = [None] * len(prompts)
        for _, same_room in groupby(order, key=lambda i: rooms[i]):
            same_room = list(same_room)
            for start in range(0, len(same_room), per_batch):
                idx = same_room[start:start + per_batch]
                for i, resp in zip(idx, self._infer_batch([prompts[i] for i in idx], cfg)):
                    results[i] = resp
        return results

    def _infer_batch(self, prompts: list[list[int]], cfg: RequestConfig) -> list[ChatCompletionResponse]:
        ids, mask = self._left_pad(prompts)
        generators = row_generators(prompts, cfg.n, cfg.seed) if cfg.seed is not None else None
        max_new = self._max_new_tokens(cfg, ids.shape[1])
        state = None
        for state in decode(self.model, ids, mask, cfg, max_new, self.stop_token_ids, self.pad_token_id, generators):
            if cfg.stop and self._all_hit_stop_words(state, cfg.stop):
                break
        tokens = state.tokens.tolist()
        responses = []
        for p, prompt in enumerate(prompts):
            choices, completion_tokens = [], 0
            for k in range(cfg.n):
                row = p * cfg.n + k
                toks = _trim(tokens[row], self.stop_token_ids)
                text, stopped_by_word = self._decode(toks, cfg.stop)
                finish = 'stop' if (bool(state.hit_stop[row]) or stopped_by_word) else 'length'
                logprobs = ChoiceLogprobs(self._token_logprobs(state, row, 0, len(toks))) if cfg.logprobs else None
                choices.append(ChatCompletionChoice(index=k, message=ChatMessage('assistant', text),
                                                    finish_reason=finish, token_ids=toks, logprobs=logprobs))
                completion_tokens += len(toks)
            usage = UsageInfo(len(prompt), completion_tokens, len(prompt) + completion_tokens)
            responses.append(ChatCompletionResponse(model=self.model_name, choices=choices, usage=usage))
        return responses

    def _decode(self, toks: list[int], stop_words: list[str] | None) -> tuple[str, bool]:
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        for word in stop_words or []:
            cut = text.find(word)
            if cut >= 0:
                return text[:cut], True
        return text, False

    def _token_logprobs(self, state, row: int, start: int, end: int) -> list[TokenLogprob]:
        """OpenAI-style entries for the generated tokens ``start:end`` of ``row``; a token's text is its own
        decoding (a piece of a multi-byte character shows as U+FFFD)."""
        def entry(cls, token_id: int, logprob: float, **extra):
            text = self.tokenizer.decode([token_id])
            return cls(text, logprob, list(text.encode('utf-8')), **extra)
        out = []
        for s in range(start, end):
            alternatives = [entry(TopLogprob, i, v) for i, v in
                            zip(state.top_ids[row, s].tolist(), state.top_logprobs[row, s].tolist())]
            out.append(entry(TokenLogprob, int(state.tokens[row, s]), float(state.logprobs[row, s]),
                             top_logprobs=alternatives))
        return out

    def _all_hit_stop_words(self, state, stop_words: list[str]) -> bool:
        for row in range(state.tokens.shape[0]):
            if bool(state.finished[row]):
                continue
            tail = self.tokenizer.decode(state.tokens[row, -16:].tolist(), skip_special_tokens=True)
            if not any(w in tail for w in stop_words):
                return False
        return True

    def infer_stream(self, request: InferRequest, request_config: RequestConfig):
        """Yield ``(deltas, finish, logprobs)`` after every decode step: the text delta of each of the ``n``
        choices, their finish reasons on the last step (else None) and, with ``cfg.logprobs``, the
        ``TokenLogprob`` entries of each choice's new tokens (else None)."""
        cfg = request_config
        prompt = self.encode_prompt(request)
        ids, mask = self._left_pad([prompt])
        generators = row_generators([prompt], cfg.n, cfg.seed) if cfg.seed is not None else None
        sent = [''] * cfg.n
        logged = [0] * cfg.n  # tokens whose log-probs were sent, per choice
        state = None
        for state in decode(self.model, ids, mask, cfg, self._max_new_tokens(cfg, ids.shape[1]), self.stop_token_ids,
                            self.pad_token_id, generators):
            deltas, logprobs = [], [] if cfg.logprobs else None
            for k in range(cfg.n):
                toks = _trim(state.tokens[k].tolist(), self.stop_token_ids)
                if logprobs is not None:
                    logprobs.append(self._token_logprobs(state, k, logged[k], len(toks)))
                    logged[k] = len(toks)
                text, _ = self._decode(toks, cfg.stop)
                if text.endswith('\ufffd'):  # an incomplete multi-byte character: wait for the next token
                    deltas.append('')
                    continue
                deltas.append(text[len(sent[k]):])
                sent[k] = text
            yield deltas, None, logprobs
        finish = ['stop' if bool(state.hit_stop[k]) else 'length' for k in range(cfg.n)]
        # flush what was held back (an unfinished multi-byte character stays as U+FFFD, as in infer())
        final = [self._decode(_trim(state.tokens[k].tolist(), self.stop_token_ids), cfg.stop)[0] for k in range(cfg.n)]
        yield [text[len(sent[k]):] for k, text in enumerate(final)], finish, [[]] * cfg.n if cfg.logprobs else None


def _trim(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """Generated ids up to (not including) the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens
