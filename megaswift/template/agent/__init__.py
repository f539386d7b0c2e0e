from .base import AgentTemplate, Function, agent_templates


def get_agent_template(name: str) -> AgentTemplate:
    if name not in agent_templates:
        import difflib
        hint = difflib.get_close_matches(name, list(agent_templates), n=1)
        raise ValueError(f"unknown agent template '{name}' (available: {', '.join(sorted(agent_templates))})"
                         + (f"; did you mean '{hint[0]}'?" if hint else ''))
    return agent_templates[name]()


class _PlainChat(AgentTemplate):
    """Placeholder until the agent templates land: passes tool-free conversations through."""

    def to_chat(self, messages, tools, default_system=None):
        if tools or any(m['role'] in ('tool_call', 'tool_response', 'tool') for m in messages):
            raise NotImplementedError('agent templates are not implemented yet')
        return [dict(m) for m in messages]


agent_templates.setdefault('hermes', _PlainChat)

__all__ = ['AgentTemplate', 'Function', 'agent_templates', 'get_agent_template']
