"""Agent templates: the unified agent format -> plain chat messages, and model output -> tool calls.

The unified agent dataset format: a ``tools`` column (JSON string or list of OpenAI-style tool
definitions) and messages with roles ``tool_call`` (content: JSON ``{"name", "arguments"}``)
and ``tool_response`` / ``tool`` (content: the tool's output). An agent template turns that
into system/user/assistant/tool messages that a chat template can render, in the format the
model was trained on (Hermes ``<tool_call>`` tags, ReAct ``Action:`` lines, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Function:
    name: str
    arguments: dict[str, Any] | str


class AgentTemplate:
    """Subclasses implement the three ``_format_*`` hooks and ``get_toolcall``."""

    def _format_tools(self, tools: list[dict], system: str | None = None, user_message: str | None = None) -> str:
        """The system prompt that presents ``tools`` (and keeps ``system``)."""
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

    def to_chat(self, messages: list[dict], tools: list[dict] | None, default_system: str | None = None) -> list[dict]:
        """Unified agent messages -> chat messages (system/user/assistant/tool). Implemented by the base."""
        raise NotImplementedError


agent_templates: dict[str, type[AgentTemplate]] = {}
