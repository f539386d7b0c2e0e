"""Llama 3.1 JSON tool calling (the official chat template's default ``tools_in_user_message`` mode).

The tools go into the first user message, which becomes::

    Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.

    Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.

    {tool 1 as JSON, indent 4}

    {user message, stripped}

The system message is left as it is (the llama3 chat template adds ``Environment: ipython`` and the
date lines itself). A call is ``{"name": ..., "parameters": {...}}``; Llama 3.1 allows one call per
turn, parallel calls are written one per line (as ms-swift does). Every tool response becomes a
message of role ``tool``, which the llama3 chat template renders as an ``ipython`` turn
(``<|start_header_id|>ipython<|end_header_id|>\\n\\n{output}<|eot_id|>``).
"""
from __future__ import annotations

import json

from .base import AgentTemplate, Function, ReactCompat, agent_templates, parse_arguments

_PREAMBLE = ('Given the following functions, please respond with a JSON for a function call with its proper '
             'arguments that best answers the given prompt.\n\n'
             'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
             'value}.Do not use variables.\n\n')
_SPECIAL = ('<|python_tag|>', '<|eom_id|>', '<|eot_id|>')


class Llama3AgentTemplate(ReactCompat, AgentTemplate):
    tools_in_user_message = True

    def _format_tools(self, tools, system=None, user_message=None):
        return system

    def _format_user_message(self, tools, content):
        listed = ''.join(json.dumps(t, ensure_ascii=False, indent=4) + '\n\n' for t in tools)
        return _PREAMBLE + listed + content.strip()

    def _format_tool_calls(self, tool_calls):
        return '\n'.join(json.dumps({'name': c.name, 'parameters': c.arguments}, ensure_ascii=False)
                         for c in tool_calls)

    def _format_tool_responses(self, assistant_content, tool_responses):
        return assistant_content, [{'role': 'tool', 'content': r} for r in tool_responses]

    def get_toolcall(self, response):
        for token in _SPECIAL:
            response = response.replace(token, '')
        decoder, functions, pos = json.JSONDecoder(), [], 0
        while (start := response.find('{', pos)) >= 0:
            try:
                obj, end = decoder.raw_decode(response, start)
            except json.JSONDecodeError:
                pos = start + 1
                continue
            pos = end
            if not isinstance(obj, dict) or not isinstance(obj.get('name'), str):
                continue
            if 'parameters' in obj or 'arguments' in obj:
                functions.append(Function(obj['name'], parse_arguments(obj.get('parameters', obj.get('arguments')))))
        return functions or self._parse_actions(response)


agent_templates['llama3'] = Llama3AgentTemplate
