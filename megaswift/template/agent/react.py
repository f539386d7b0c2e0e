"""ReAct prompts (English and Chinese), worded as in Qwen's ReAct prompt and ms-swift's react_en/react_zh.

Each tool is described as::

    {name}: Call this tool to interact with the {name_for_human} API. What is the {name_for_human} API
    useful for? {description} Parameters: {parameters JSON} Format the arguments as a JSON object.

A call is ``Action: {name}\\nAction Input: {arguments JSON}\\n`` (parallel calls repeat the pair)
followed by ``Observation:``, where the model stops. The tool's output is appended to the same
assistant turn (``Observation: {output}\\n``) and the next assistant message continues it, e.g.
``Thought: I now know the final answer\\nFinal Answer: ...``. The ``react`` loss scale gives the
text after ``Observation:`` weight 0, so the model never learns to write tool outputs.

A given system prompt is kept in front of the ReAct prompt, separated by a blank line (ms-swift
drops it).
"""
from __future__ import annotations

import json

from .base import AgentTemplate, ReactCompat, agent_templates, dump_arguments, unwrap_tool

_EN = {
    'desc': ('{name}: Call this tool to interact with the {human} API. What is the {human} API useful for? '
             '{description} Parameters: {parameters} Format the arguments as a JSON object.'),
    'head': 'Answer the following questions as best you can. You have access to the following tools:\n\n',
    'tail': """

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!
""",
}

_ZH = {
    'desc': ('{name}: 调用此工具与 {human} API 进行交互。{human} 有什么用？{description} '
             '输入参数：{parameters} 此工具的输入应为JSON对象。'),
    'head': '尽可能地回答以下问题。你可以使用以下工具:\n\n',
    'tail': """

请按照以下格式进行:

Question: 需要你回答的输入问题
Thought: 你应该总是思考该做什么
Action: 需要使用的工具，应该是[{names}]中的一个
Action Input: 传入工具的内容
Observation: 行动的结果
... (这个Thought/Action/Action Input/Observation可以重复N次)
Thought: 我现在知道最后的答案
Final Answer: 对原始输入问题的最终答案

现在开始！
""",
}


def tool_fields(tool: dict) -> dict:
    """name, human-readable name, description and parameters JSON of a tool definition."""
    fn = unwrap_tool(tool)
    name = fn.get('name_for_model') or fn['name']
    params = fn.get('parameters') or {}
    return {'name': name, 'human': fn.get('name_for_human') or name,
            'description': fn.get('description') or fn.get('description_for_model') or '',
            'parameters': params if isinstance(params, str) else json.dumps(params, ensure_ascii=False)}


class ReactEnAgentTemplate(ReactCompat, AgentTemplate):
    prompt = _EN

    def _format_tools(self, tools, system=None, user_message=None):
        fields = [tool_fields(t) for t in tools]
        text = (self.prompt['head'] + '\n\n'.join(self.prompt['desc'].format(**f) for f in fields)
                + self.prompt['tail'].format(names=','.join(f['name'] for f in fields)))
        return f'{system}\n\n{text}' if system else text

    def _format_tool_calls(self, tool_calls):
        return ''.join(f'{self.action} {c.name}\n{self.action_input} {dump_arguments(c.arguments)}\n'
                       for c in tool_calls) + self.observation

    def _format_tool_responses(self, assistant_content, tool_responses):
        content = assistant_content
        for k, response in enumerate(tool_responses):
            if k > 0 or not content.endswith(self.observation):  # the calls end with 'Observation:'
                content += ('' if not content or content.endswith('\n') else '\n') + self.observation
            content += f' {response}' + ('' if response.endswith('\n') else '\n')
        return content, []

    def get_toolcall(self, response):
        return self._parse_actions(response)


class ReactZhAgentTemplate(ReactEnAgentTemplate):
    prompt = _ZH


agent_templates['react_en'] = ReactEnAgentTemplate
agent_templates['react_zh'] = ReactZhAgentTemplate
