"""Qwen-Agent's function-calling format (``✿FUNCTION✿`` / ``✿ARGS✿`` / ``✿RESULT✿`` / ``✿RETURN✿``).

System: ``{system}\\n\\n`` (when given) + ``# Tools\\n\\n## You have access to the following tools:\\n\\n``
+ tool descriptions (``### {name_for_human}\\n\\n{name}: {description} Parameters: {JSON} Format the
arguments as a JSON object.``) + the command list. Calls: ``✿FUNCTION✿: {name}\\n✿ARGS✿: {JSON}``
joined by newlines (after the assistant text and a newline). Results stay in the assistant turn:
``\\n✿RESULT✿: {output}`` per response, then ``\\n✿RETURN✿: `` which the next assistant text continues.
This follows Qwen-Agent's ``QwenFnCallPrompt.preprocess_fncall_messages``; the ``_parallel``
variants only change the prompt's command list.
"""
from __future__ import annotations

from .base import AgentTemplate, ReactCompat, agent_templates, dump_arguments
from .react import tool_fields

FN_NAME, FN_ARGS, FN_RESULT, FN_EXIT = '✿FUNCTION✿', '✿ARGS✿', '✿RESULT✿', '✿RETURN✿'

_INFO = {
    'en': ('# Tools\n\n## You have access to the following tools:\n\n',
           '### {human}\n\n{name}: {description} Parameters: {parameters} {args_format}'),
    'zh': ('# 工具\n\n## 你拥有如下工具：\n\n',
           '### {human}\n\n{name}: {description} 输入参数：{parameters} {args_format}'),
}
_ARGS_FORMAT = {
    'en': ('Format the arguments as a JSON object.',
           'Enclose the code within triple backticks (`) at the beginning and end of the code.'),
    'zh': ('此工具的输入应为JSON对象。', '此工具的输入应为Markdown代码块。'),
}
_FMT = {
    'en': f"""## When you need to call a tool, please insert the following command in your reply, which can be called zero or multiple times according to your needs:

{FN_NAME}: The tool to use, should be one of [{{names}}]
{FN_ARGS}: The input of the tool
{FN_RESULT}: Tool results
{FN_EXIT}: Reply based on tool results. Images need to be rendered as ![](url)""",
    'zh': f"""## 你可以在回复中插入零次、一次或多次以下命令以调用工具：

{FN_NAME}: 工具名称，必须是[{{names}}]之一。
{FN_ARGS}: 工具输入
{FN_RESULT}: 工具结果
{FN_EXIT}: 根据工具结果进行回复，需将图片用![](url)渲染出来""",
    'en_parallel': f"""## Insert the following command in your reply when you need to call N tools in parallel:

{FN_NAME}: The name of tool 1, should be one of [{{names}}]
{FN_ARGS}: The input of tool 1
{FN_NAME}: The name of tool 2
{FN_ARGS}: The input of tool 2
...
{FN_NAME}: The name of tool N
{FN_ARGS}: The input of tool N
{FN_RESULT}: The result of tool 1
{FN_RESULT}: The result of tool 2
...
{FN_RESULT}: The result of tool N
{FN_EXIT}: Reply based on tool results. Images need to be rendered as ![](url)""",
    'zh_parallel': f"""## 你可以在回复中插入以下命令以并行调用N个工具：

{FN_NAME}: 工具1的名称，必须是[{{names}}]之一
{FN_ARGS}: 工具1的输入
{FN_NAME}: 工具2的名称
{FN_ARGS}: 工具2的输入
...
{FN_NAME}: 工具N的名称
{FN_ARGS}: 工具N的输入
{FN_RESULT}: 工具1的结果
{FN_RESULT}: 工具2的结果
...
{FN_RESULT}: 工具N的结果
{FN_EXIT}: 根据工具结果进行回复，需将图片用![](url)渲染出来""",
}


class QwenEnAgentTemplate(ReactCompat, AgentTemplate):
    lang, parallel = 'en', False
    action, action_input, observation = f'{FN_NAME}:', f'{FN_ARGS}:', f'{FN_RESULT}:'
    stop_words = (FN_RESULT, FN_EXIT)

    def _format_tools(self, tools, system=None, user_message=None):
        head, desc = _INFO[self.lang]
        descs, names = [], []
        for tool in tools:
            f = tool_fields(tool)
            fmt = _ARGS_FORMAT[self.lang][f['name'] == 'code_interpreter']
            descs.append(desc.format(args_format=fmt, **f).rstrip())
            names.append(f['name'])
        fmt = _FMT[self.lang + ('_parallel' if self.parallel else '')].format(names=','.join(names))
        text = head + '\n\n'.join(descs) + '\n\n' + fmt
        return f'{system}\n\n{text}' if system else text

    def _format_tool_calls(self, tool_calls):
        return '\n'.join(f'{FN_NAME}: {c.name}\n{FN_ARGS}: {dump_arguments(c.arguments)}' for c in tool_calls)

    def _join_tool_calls(self, content, calls_text):
        return f'{content}\n{calls_text}' if content else calls_text

    def _format_tool_responses(self, assistant_content, tool_responses):
        results = ''.join(f'\n{FN_RESULT}: {r}' for r in tool_responses)
        return f'{assistant_content}{results}\n{FN_EXIT}: ', []

    def get_toolcall(self, response):
        return self._parse_actions(response)


class QwenZhAgentTemplate(QwenEnAgentTemplate):
    lang = 'zh'


class QwenEnParallelAgentTemplate(QwenEnAgentTemplate):
    parallel = True


class QwenZhParallelAgentTemplate(QwenZhAgentTemplate):
    parallel = True


agent_templates['qwen_en'] = QwenEnAgentTemplate
agent_templates['qwen_zh'] = QwenZhAgentTemplate
agent_templates['qwen_en_parallel'] = QwenEnParallelAgentTemplate
agent_templates['qwen_zh_parallel'] = QwenZhParallelAgentTemplate
