"""Agent templates (registry ``agent_templates``): hermes, react_en/zh, qwen_en/zh(_parallel), llama3."""
from . import hermes, llama3, qwen, react
from .base import AgentTemplate, Function, agent_templates

_BUILTIN = (hermes, llama3, qwen, react)  # imported to register the built-in templates


def get_agent_template(name: str) -> AgentTemplate:
    if name not in agent_templates:
        import difflib
        hint = difflib.get_close_matches(name, list(agent_templates), n=1)
        raise ValueError(f"unknown agent template '{name}' (available: {', '.join(sorted(agent_templates))})"
                         + (f"; did you mean '{hint[0]}'?" if hint else ''))
    return agent_templates[name]()


__all__ = ['AgentTemplate', 'Function', 'agent_templates', 'get_agent_template']
