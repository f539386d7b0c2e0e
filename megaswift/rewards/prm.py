"""Process reward models: a local HF reward model and an OpenAI-compatible HTTP client.

Both read the ``messages`` column (the prompt conversation, without the completion; None or
missing means an empty conversation) and score ``messages + [assistant completion]``.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..utils.http import HTTPStatusError, request_json
from .base import PRM, prms
from .orm import column

logger = logging.getLogger(__name__)

BASE_URL_ENV = 'MEGASWIFT_PRM_BASE_URL'
KNOWN_STEP_TOKENS = ('<extra_0>',)  # Qwen2.5-Math-PRM


def conversation(messages: list[dict] | None, completion: str) -> list[dict]:
    """``messages`` (copied) followed by the completion as the assistant turn."""
    return [dict(m) for m in (messages or [])] + [{'role': 'assistant', 'content': completion}]


def split_steps(completion: str, step_separator: str | None = None) -> list[str]:
    """Non-blank steps of a completion split on ``step_separator`` (default: blank lines).

    A completion without any non-blank step is one (possibly empty) step, so every
    completion gets at least one step score.
    """
    parts = (completion or '').split(step_separator or '\n\n')
    steps = [p.strip() for p in parts if p.strip()]
    return steps or [(completion or '').strip()]


class RewardModelPRM(PRM):
    """Scores completions with a local HF reward-model checkpoint.

    * ``*ForSequenceClassification`` (outcome RM): one float per completion, the logit of the
      last token of ``chat_template(messages + [assistant completion])`` (for 2 labels, the
      probability of label 1).
    * ``*ForTokenClassification`` or a remote-code ``*ProcessRewardModel`` with 2 labels
      (process RM): the completion is split into steps (``step_separator``, default blank
      lines), each step is followed by the tokenizer's step token (``<extra_0>`` for
      Qwen2.5-Math-PRM, else the separator text) and the result is a list with the
      probability of label 1 at the last token of every step separator.

    Inputs are left-padded into batches of ``batch_size`` (sorted by length) and run under
    ``torch.inference_mode()``.
    """

    def __init__(self, model: str, torch_dtype: str = 'float32', batch_size: int = 8,
                 step_separator: str | None = None, step_token: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from megaswift.model import parse_dtype, resolve_model_dir
        self.model_dir = resolve_model_dir(model)
        self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        self.batch_size = max(1, int(batch_size))
        self.step_separator = step_separator
        config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        arch = (getattr(config, 'architectures', None) or [''])[0]
        dtype = parse_dtype(torch_dtype, self.device)
        if arch.endswith('ForSequenceClassification'):
            from transformers import AutoModelForSequenceClassification as auto_cls
            self.kind = 'outcome'
        elif arch.endswith('ForTokenClassification'):
            from transformers import AutoModelForTokenClassification as auto_cls
            self.kind = 'process'
        elif arch.endswith('ProcessRewardModel'):
            from transformers import AutoModel as auto_cls
            self.kind = 'process'
        else:
            raise ValueError(f"reward model '{model}' has architecture '{arch or '?'}'; supported are "
                             '*ForSequenceClassification (outcome), *ForTokenClassification and '
                             '*ProcessRewardModel (process, with trust_remote_code=True)')
        self.model = auto_cls.from_pretrained(self.model_dir, dtype=dtype,
                                              trust_remote_code=trust_remote_code).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        text_config = self.model.config.get_text_config()
        if self.kind == 'outcome':
            # HF pools the rightmost token that is not pad_token_id. Inputs are left-padded, so the
            # last position is always real; an impossible id stops a real token equal to the pad
            # token (e.g. <|im_end|>) from being skipped.
            text_config.pad_token_id = -1
        self.num_labels = int(getattr(self.model.config, 'num_labels', 1) or 1)
        self.step_token = step_token or self._find_step_token()
        self._pass_position_ids = 'position_ids' in inspect.signature(self.model.forward).parameters
        logger.info('reward model %s (%s, %s) on %s', self.model_dir, arch, self.kind, self.device)

    def _find_step_token(self) -> str:
        for owner in (self.tokenizer, self.model.config):
            token = getattr(owner, 'step_token', None)
            if isinstance(token, str) and token:
                return token
        vocab = self.tokenizer.get_vocab()
        for token in KNOWN_STEP_TOKENS:
            if token in vocab:
                return token
        return self.step_separator or '\n\n'

    def render(self, messages: list[dict] | None, content: str) -> str:
        """The text the model reads: the chat template of the conversation ending in ``content``."""
        conv = conversation(messages, content)
        if getattr(self.tokenizer, 'chat_template', None):
            return self.tokenizer.apply_chat_template(conv, tokenize=False)
        return ''.join(f"{m['role']}: {m['content']}\n" for m in conv)

    def _encode(self, text: str, offsets: bool = False):
        add_special = not getattr(self.tokenizer, 'chat_template', None)
        return self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=offsets)

    def _process_input(self, messages: list[dict] | None, completion: str) -> tuple[list[int], list[int]]:
        """Token ids and the index of the last token of each step's separator."""
        if not getattr(self.tokenizer, 'is_fast', False):
            raise ValueError(f'the process reward model in {self.model_dir} needs a fast tokenizer (offset mapping)')
        steps, sep = split_steps(completion, self.step_separator), self.step_token
        content = sep.join(steps) + sep
        text = self.render(messages, content)
        start = text.rfind(content)
        ends = []
        if start >= 0:
            pos = start
            for step in steps:
                pos += len(step) + len(sep)
                ends.append(pos - 1)
        else:  # the template stripped the trailing separator: score the last step at its last character
            body = sep.join(steps)
            start = text.rfind(body)
            if start < 0:
                raise ValueError(f'could not locate the completion in the chat template output of {self.model_dir}')
            pos = start
            for i, step in enumerate(steps):
                pos += len(step) + (len(sep) if i < len(steps) - 1 else 0)
                ends.append(pos - 1)
        enc = self._encode(text, offsets=True)
        ids, spans = enc['input_ids'], enc['offset_mapping']
        positions = []
        for char in ends:
            index = None
            for k, (s, e) in enumerate(spans):
                if e > s and s <= char:
                    index = k
                if s > char:
                    break
            if index is None:
                raise ValueError(f'no token covers character {char} of the rendered conversation')
            positions.append(index)
        return ids, positions

    def _forward(self, batch: list[list[int]]):
        """Logits of a left-padded batch: ``[B, num_labels]`` (outcome) or ``[B, T, num_labels]`` (process)."""
        import torch
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids):] = 1
        kwargs = {'input_ids': input_ids.to(self.device), 'attention_mask': mask.to(self.device)}
        if self._pass_position_ids:
            kwargs['position_ids'] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, 'logits') else out[0]
        return logits.float().cpu()

    def _to_score(self, logits) -> float:
        import torch
        if logits.shape[-1] == 1:
            return float(logits[0]) if self.kind == 'outcome' else float(torch.sigmoid(logits[0]))
        return float(torch.softmax(logits, dim=-1)[1])

    def __call__(self, completions: list[str], **columns: Any) -> list[float | list[float]]:
        import torch
        messages = column(columns, 'messages', len(completions))
        if self.kind == 'outcome':
            inputs = [(self._encode(self.render(m, c))['input_ids'], None) for m, c in zip(messages, completions)]
        else:
            inputs = [self._process_input(m, c) for m, c in zip(messages, completions)]
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]))
        results: list[Any] = [None] * len(inputs)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                chunk = order[b:b + self.batch_size]
                logits = self._forward([inputs[i][0] for i in chunk])
                width = logits.shape[1] if self.kind == 'process' else 0
                for row, i in enumerate(chunk):
                    ids, positions = inputs[i]
                    if self.kind == 'outcome':
                        results[i] = self._to_score(logits[row])
                    else:
                        shift = width - len(ids)
                        results[i] = [self._to_score(logits[row, shift + p]) for p in positions]
        return results


def reward_model_from_path(model: str, **kwargs: Any) -> RewardModelPRM:
    """A :class:`RewardModelPRM` for a model path or hub id, independent of the registries."""
    return RewardModelPRM(model=model, **kwargs)


def parse_score(content: Any, url: str) -> float | list[float]:
    """A reward server's reply content as a finite number or a non-empty list of them."""
    def bad() -> ValueError:
        return ValueError(f'reward server {url} replied {content!r}; expected a number or a JSON list of numbers')

    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad()
        return float(v)

    if isinstance(content, (int, float, list)) and not isinstance(content, bool):
        value = content
    else:
        try:
            value = json.loads(str(content).strip())
        except ValueError:
            raise bad() from None
    if isinstance(value, list):
        if not value:
            raise bad()
        return [number(v) for v in value]
    return number(value)


class ClientPRM(PRM):
    """``client``: asks an OpenAI-compatible ``/chat/completions`` server for the rewards.

    Each ``messages + [assistant completion]`` conversation is POSTed (concurrently, up to
    ``max_workers``); the reply's assistant content must be a number, or a JSON list of numbers
    for per-step rewards. ``base_url`` defaults to ``$MEGASWIFT_PRM_BASE_URL``. Connection errors
    and 5xx replies are retried ``max_retries`` times, sleeping ``retry_backoff * 2**attempt``
    seconds, then raise ``ConnectionError``. ``model`` is sent only when given.
    """

    def __init__(self, base_url: str | None = None, api_key: str = 'EMPTY', model: str | None = None,
                 timeout: float = 60, max_workers: int = 8, max_retries: int = 3, retry_backoff: float = 1.0,
                 extra_body: dict | None = None):
        base_url = base_url or os.environ.get(BASE_URL_ENV)
        if not base_url:
            raise ValueError(f'the client PRM needs a server URL: set {BASE_URL_ENV} or pass '
                             '--prm_kwargs \'{"base_url": "http://host:port/v1"}\'')
        base_url = base_url.rstrip('/')
        self.url = base_url if base_url.endswith('/chat/completions') else base_url + '/chat/completions'
        self.api_key, self.model, self.timeout = api_key, model, timeout
        self.max_workers = max(1, int(max_workers))
        self.max_retries, self.retry_backoff = max(0, int(max_retries)), retry_backoff
        self.extra_body = dict(extra_body or {})

    def _post(self, payload: dict) -> dict:
        try:
            return request_json(self.url, payload, self.api_key, self.timeout, self.max_retries, self.retry_backoff)
        except HTTPStatusError as e:
            raise RuntimeError(f'reward server {e}') from None
        except ConnectionError as e:
            raise ConnectionError(f'reward server {e}') from e

    def score(self, messages: list[dict] | None, completion: str) -> float | list[float]:
        """The reward of one completion."""
        payload = dict(self.extra_body, messages=conversation(messages, completion))
        if self.model is not None:
            payload['model'] = self.model
        reply = self._post(payload)
        try:
            content = reply['choices'][0]['message']['content']
        except (KeyError, IndexError, TypeError):
            raise ValueError(f'reward server {self.url} sent no chat completion: {str(reply)[:300]!r}') from None
        return parse_score(content, self.url)

    def __call__(self, completions: list[str], **columns: Any) -> list[float | list[float]]:
        messages = column(columns, 'messages', len(completions))
        if not completions:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(completions))) as pool:
            return list(pool.map(self.score, messages, completions))


prms.update({'client': ClientPRM})

__all__ = ['RewardModelPRM', 'ClientPRM', 'reward_model_from_path', 'split_steps', 'conversation', 'parse_score']
