"""Agent templates: the unified agent format -> plain chat messages, and model output -> tool calls.

The unified agent dataset format: a ``tools`` column (JSON string or list of OpenAI-style tool
definitions) and messages with roles ``tool_call`` (content: JSON ``{"name", "arguments"}``)
and ``tool_response`` / ``tool`` (content: the tool's output). An agent template turns that
into system/user/assistant/tool messages that a chat template can render, in the format the
model was trained on (Hermes ``<tool_call>`` tags, ReAct ``Action:`` lines, ...).

``AgentTemplate.to_chat`` (shared by all templates) walks the conversation:

- a system message (or ``default_system``) plus the tools become one system message via
  ``_format_tools``; ``_format_user_message`` may also rewrite the first user message
  (Llama 3.1 lists its tools there);
- consecutive ``tool_call`` messages are parallel calls of one assistant turn, formatted by
  ``_format_tool_calls`` and appended to the assistant text that precedes them (if any);
- consecutive tool responses are grouped and handed to ``_format_tool_responses``, which
  returns the (possibly extended) assistant content and the messages that carry the
  responses. When it returns no messages (ReAct, Qwen) the assistant turn stays open and the
  next assistant text or tool call continues it, so the model keeps talking in one turn.

A conversation without tools and without tool roles is returned unchanged (as copies).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...utils.registry import Registry
from ..errors import TemplateError

TOOL_RESPONSE_ROLES = ('tool_response', 'tool')
KNOWN_ROLES = ('system', 'user', 'assistant', 'tool_call') + TOOL_RESPONSE_ROLES


@dataclass
class Function:
    name: str
    arguments: dict[str, Any] | str


def parse_arguments(arguments: Any) -> dict[str, Any] | str:
    """Arguments as a dict when they are (or encode) a JSON object, else as the raw string."""
    if arguments is None:
        return {}
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return json.dumps(arguments, ensure_ascii=False)


def dump_arguments(arguments: dict[str, Any] | str) -> str:
    """The JSON text of dict arguments; a raw string stays as it is."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def unwrap_tool(tool: dict) -> dict:
    """``{"type": "function", "function": {...}}`` -> ``{...}``; a bare function is returned as is."""
    return tool['function'] if isinstance(tool.get('function'), dict) else tool


def wrap_tool(tool: dict) -> dict:
    """A bare function ``{name, description, parameters}`` -> the OpenAI tool form."""
    return tool if isinstance(tool.get('function'), dict) else {'type': 'function', 'function': tool}


class AgentTemplate:
    """Subclasses implement the three ``_format_*`` hooks and ``get_toolcall``."""
    tools_in_user_message = False  # True: ``_format_user_message`` lists the tools, so a user message is required

    def _format_tools(self, tools: list[dict], system: str | None = None,
                      user_message: str | None = None) -> str | None:
        """The system prompt that presents ``tools`` (and keeps ``system``); ``None``/'' for no system message."""
        raise NotImplementedError

    def _format_tool_calls(self, tool_calls: list[Function]) -> str:
        """The assistant text that performs these calls."""
        raise NotImplementedError

    def _format_tool_responses(self, assistant_content: str, tool_responses: list[str]) -> tuple[str, list[dict]]:
        """Return the (possibly extended) assistant content and the messages that carry the responses."""
        raise NotImplementedError

    def get_toolcall(self, response: str) -> list[Function]:
        """Parse the tool calls in a model's response (empty list when there is none)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ overridable glue
    def _format_user_message(self, tools: list[dict], content: str) -> str:
        """The first user message when tools are given (unchanged unless the model lists tools there)."""
        return content

    def _join_tool_calls(self, content: str, calls_text: str) -> str:
        """Assistant text followed by its tool calls; default: on a new line."""
        if not content or content.endswith('\n'):
            return content + calls_text
        return content + '\n' + calls_text

    # ------------------------------------------------------------------ shared conversion
    @staticmethod
    def normalize_tools(tools: Any) -> list[dict]:
        """The tools as a list of dicts (a JSON string, one tool, or a list whose items may be JSON strings)."""
        if tools is None or tools == '' or tools == []:
            return []
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise TemplateError(f'is not valid JSON ({e.msg})', 'tools') from None
        if isinstance(tools, dict):
            tools = [tools]
        if not isinstance(tools, list):
            raise TemplateError(f'must be a list of tool definitions, got {type(tools).__name__}', 'tools')
        out = []
        for i, tool in enumerate(tools):
            if isinstance(tool, str):
                try:
                    tool = json.loads(tool)
                except json.JSONDecodeError as e:
                    raise TemplateError(f'is not valid JSON ({e.msg})', f'tools[{i}]') from None
            if not isinstance(tool, dict) or not isinstance(unwrap_tool(tool).get('name'), str):
                raise TemplateError("must be a tool definition with a 'name'", f'tools[{i}]')
            out.append(tool)
        return out

    @staticmethod
    def parse_tool_call(content: Any, field: str) -> Function:
        """A ``tool_call`` message's content -> Function; errors name ``field``."""
        obj = content
        if isinstance(content, str):
            try:
                obj = json.loads(content)
            except json.JSONDecodeError as e:
                raise TemplateError(f'tool call is not valid JSON ({e.msg}): {content[:80]!r}', field) from None
        if isinstance(obj, dict) and isinstance(obj.get('function'), dict):  # OpenAI {"type", "function": {...}}
            obj = obj['function']
        if not isinstance(obj, dict) or not isinstance(obj.get('name'), str) or not obj['name']:
            raise TemplateError("tool call must be a JSON object with a 'name'", field)
        arguments = obj.get('arguments', obj.get('parameters'))
        return Function(obj['name'], parse_arguments(arguments))

    def to_chat(self, messages: list[dict], tools: list[dict] | None, default_system: str | None = None) -> list[dict]:
        """Unified agent messages -> chat messages (system/user/assistant/tool)."""
        tools = self.normalize_tools(tools)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get('role') not in KNOWN_ROLES:
                role = m.get('role') if isinstance(m, dict) else m
                raise TemplateError(f"unknown role {role!r} (expected one of {', '.join(KNOWN_ROLES)})", f'messages[{i}].role')
        has_agent_roles = any(m['role'] in ('tool_call',) + TOOL_RESPONSE_ROLES or m.get('tool_calls')
                              for m in messages)
        if not tools and not has_agent_roles:
            return [dict(m) for m in messages]

        out: list[dict] = []
        start = 0
        system, system_msg = None, {}
        if messages and messages[0]['role'] == 'system':
            system_msg, system, start = messages[0], messages[0].get('content'), 1
        if tools:
            first_user = next((m.get('content') or '' for m in messages if m['role'] == 'user'), None)
            system = self._format_tools(tools, system or default_system, first_user)
            if system:
                out.append({**system_msg, 'role': 'system', 'content': system})
        elif start:
            out.append(dict(system_msg))

        turn: dict | None = None       # the open assistant message that calls/continuations extend
        calls: list[Function] = []     # pending parallel calls of that turn
        first_user_done = not tools
        i = start
        while i < len(messages):
            m = messages[i]
            role = m['role']
            if role in ('system', 'user'):
                self._flush(turn, calls)
                turn = None
                msg = {**m, 'content': m.get('content') or ''}
                if role == 'user' and not first_user_done:
                    msg['content'] = self._format_user_message(tools, msg['content'])
                    first_user_done = True
                out.append(msg)
            elif role == 'assistant':
                if calls:  # calls with no response, then more assistant text: a new turn
                    self._flush(turn, calls)
                    turn = None
                text = m.get('content') or ''
                extra = {k: v for k, v in m.items() if k != 'tool_calls'}
                if turn is None:
                    turn = {**extra, 'role': 'assistant', 'content': text}
                    out.append(turn)
                else:  # continuing a turn after in-turn observations (ReAct / Qwen)
                    turn['content'] += text
                for j, call in enumerate(m.get('tool_calls') or []):
                    calls.append(self.parse_tool_call(call, f'messages[{i}].tool_calls[{j}]'))
            elif role == 'tool_call':
                if turn is None:
                    turn = {**{k: v for k, v in m.items() if k != 'content'}, 'role': 'assistant', 'content': ''}
                    out.append(turn)
                calls.append(self.parse_tool_call(m.get('content'), f'messages[{i}].content'))
            else:  # a group of consecutive tool responses
                if not calls:
                    raise TemplateError('tool response has no preceding tool call', f'messages[{i}].role')
                self._flush(turn, calls)
                responses = []
                while i < len(messages) and messages[i]['role'] in TOOL_RESPONSE_ROLES:
                    content = messages[i].get('content')
                    responses.append(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
                    i += 1
                before = turn['content']
                turn['content'], new_messages = self._format_tool_responses(before, responses)
                _mark_tool_output(turn, before, responses)
                out.extend({**nm, 'tool_response': True} if nm.get('role') != 'assistant' else nm
                           for nm in new_messages)
                if new_messages:
                    turn = None
                continue
            i += 1
        self._flush(turn, calls)
        if self.tools_in_user_message and not first_user_done:
            raise TemplateError('tools are listed in the first user message, but there is none', 'messages')
        return out

    def _flush(self, turn: dict | None, calls: list[Function]) -> None:
        """Append the pending calls to the open assistant turn."""
        if calls:
            turn['content'] = self._join_tool_calls(turn['content'], self._format_tool_calls(calls))
            calls.clear()


def _mark_tool_output(turn: dict, before: str, responses: list[str]) -> None:
    """Record where tool outputs sit inside an assistant turn (``turn['tool_spans']``) so they are never trained.

    Templates that write responses into the assistant turn (ReAct ``Observation:``, Qwen ``✿RESULT✿``)
    append them verbatim after the existing content; each response is located in that appended
    text, in order.
    """
    content = turn['content']
    if content == before:
        return  # the responses went into separate messages
    if not content.startswith(before):
        raise ValueError('_format_tool_responses must only append to the assistant content')
    pos = len(before)
    for response in responses:
        start = content.find(response, pos)
        if start < 0:
            raise ValueError('_format_tool_responses must include each tool response verbatim')
        turn.setdefault('tool_spans', []).append([start, start + len(response)])
        pos = start + len(response)


class ReactCompat:
    """Parsing of ``Action:`` / ``Action Input:`` pairs (ReAct, and Qwen's ✿FUNCTION✿ format)."""
    action, action_input, observation = 'Action:', 'Action Input:', 'Observation:'
    stop_words: tuple[str, ...] = ('Observation:', 'Thought:', 'Final Answer:')

    def _parse_actions(self, response: str) -> list[Function]:
        functions = []
        pos = 0
        while True:
            a = response.find(self.action, pos)
            if a < 0:
                return functions
            b = response.find(self.action_input, a + len(self.action))
            if b < 0:
                return functions
            name = response[a + len(self.action):b].strip()
            start = b + len(self.action_input)
            ends = [k for k in (response.find('\n' + w, start) for w in (self.action,) + self.stop_words) if k >= 0]
            end = min(ends) if ends else len(response)
            args = response[start:end].strip()
            if name:
                functions.append(Function(name, parse_arguments(args)))
            pos = end


agent_templates = Registry('agent template')
