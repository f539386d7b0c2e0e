"""Agent templates (registry ``agent_templates``): hermes, react_en/zh, qwen_en/zh(_parallel), llama3."""
from . import hermes, llama3, qwen, react
from .base import AgentTemplate, Function, agent_templates

_BUILTIN = (hermes, llama3, qwen, react)  # imported to register the built-in templates


def get_agent_template(name: str) -> AgentTemplate:
    return agent_templates.lookup(name, '--agent_template')()


__all__ = ['AgentTemplate', 'Function', 'agent_templates', 'get_agent_template']
