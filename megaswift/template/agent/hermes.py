"""Hermes-style tool calling as in the Qwen2.5 / Qwen3 chat templates.

System prompt (``{system}\\n\\n`` is left out when there is no system)::

    {system}

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {one JSON tool per line, OpenAI form}
    </tools>

    For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

Calls: ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` joined by newlines, after
the assistant text and a newline. Responses: one user turn of ``<tool_response>\\n...\\n</tool_response>``
blocks joined by newlines. With ChatML rendering this is byte-identical to Qwen2.5-Instruct's
chat template (``tests/template/test_agent_templates.py`` checks it against the real jinja).
"""
from __future__ import annotations

import json
import re

from .base import AgentTemplate, Function, ReactCompat, agent_templates, parse_arguments, wrap_tool

_TOOL_CALL = re.compile(r'<tool_call>(.*?)(?:</tool_call>|$)', re.DOTALL)


class HermesAgentTemplate(ReactCompat, AgentTemplate):

    def _format_tools(self, tools, system=None, user_message=None):
        lines = '\n'.join(json.dumps(wrap_tool(t), ensure_ascii=False) for t in tools)
        prefix = f'{system}\n\n' if system else ''
        return (f'{prefix}# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
                'You are provided with function signatures within <tools></tools> XML tags:\n'
                f'<tools>\n{lines}\n</tools>\n\n'
                'For each function call, return a json object with function name and arguments within '
                '<tool_call></tool_call> XML tags:\n<tool_call>\n'
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

    def _format_tool_calls(self, tool_calls):
        return '\n'.join('<tool_call>\n' + json.dumps({'name': c.name, 'arguments': c.arguments}, ensure_ascii=False)
                         + '\n</tool_call>' for c in tool_calls)

    def _join_tool_calls(self, content, calls_text):
        return f'{content}\n{calls_text}' if content else calls_text  # Qwen: '\n' + content, then '\n<tool_call>'

    def _format_tool_responses(self, assistant_content, tool_responses):
        text = '\n'.join(f'<tool_response>\n{r}\n</tool_response>' for r in tool_responses)
        return assistant_content, [{'role': 'user', 'content': text}]

    def get_toolcall(self, response):
        functions = []
        for block in _TOOL_CALL.findall(response):
            try:
                obj = json.loads(block.strip())
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get('name'), str):
                functions.append(Function(obj['name'], parse_arguments(obj.get('arguments', obj.get('parameters')))))
        return functions or self._parse_actions(response)  # ms-swift compat: ReAct-style answers


agent_templates['hermes'] = HermesAgentTemplate
