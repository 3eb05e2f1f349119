"""Opt-in: the real Codex CLI through cch to a Chat Completions and to an Anthropic Messages
upstream (``CCH_CODEX_E2E=1``, as tests/test_codex_e2e.py; issue 16, docs/providers.md).

The fake upstream plays a model that wants a shell command run: its first answer is a tool call
to whichever shell tool Codex offered (Codex's tools reach it translated), Codex runs the
command and sends its output back, the fake finds that output in the next request (a ``tool``
message / a ``tool_result`` block) and answers with a sentence quoting it, which Codex prints.
The ledger row of each generating turn carries the tokens the fake reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import RunningGateway, gateway_config
from test_codex_e2e import (
    CLIENT_KEY,
    ENABLED,
    KEY_NAME,
    CodexSession,
    usage_rows,
)
from test_codex_e2e import codex as codex_fixture  # noqa: F401  (the `codex` fixture)
from twisted.internet import reactor

from cch.config import ClientKey, ProviderConfig, UsageConfig
from cch.service import makeService
from cch.testing import FakeUpstream, Recorded, Script
from cch.testing.anthropic_scripts import (
    message_delta,
    message_start,
    message_stop,
    messages_sse,
    text_block,
    tool_use_block,
)
from cch.testing.chat_scripts import ToolCall, chat_events, chat_sse, chat_usage

pytestmark = [
    pytest.mark.skipif(not ENABLED, reason="set CCH_CODEX_E2E=1 to run the real Codex CLI"),
    pytest.mark.timeout(600),
]

MARKER = "cch-tool-round-trip-7f3a"  # what the command prints, and the answer quotes
ANSWER = f"The command printed {MARKER}."
RUN_TIMEOUT = 180
SHELL_TOOLS = ("shell", "exec_command", "shell_command", "container.exec")
CHAT_USAGE = (1500, 40)  # prompt, completion tokens the fake reports on every answer
ANTHROPIC_USAGE = (1700, 45)


def shell_call(tools: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The name and arguments of a call to the shell tool Codex offered, whatever its schema:
    ``command`` as an argv array or a string, or ``cmd``."""
    by_name = {}
    for tool in tools:
        function = tool.get("function", tool)  # Chat nests it; Anthropic does not
        schema = function.get("parameters") or function.get("input_schema") or {}
        by_name[function.get("name")] = schema.get("properties", {})
    for name in SHELL_TOOLS:
        if name in by_name:
            properties = by_name[name]
            break
    else:
        raise AssertionError(f"no shell tool among {sorted(n for n in by_name if n)}")
    if "command" in properties:
        kind = properties["command"].get("type")
        command: Any = ["echo", MARKER] if kind == "array" else f"echo {MARKER}"
        return name, {"command": command}
    if "cmd" in properties:
        return name, {"cmd": f"echo {MARKER}"}
    raise AssertionError(f"the {name} tool takes neither command nor cmd: {sorted(properties)}")


def tool_output_seen(recorded: Recorded) -> bool:
    """The request carries the command's output back (a tool message / tool_result block)."""
    for message in recorded.body.get("messages", []):
        if message.get("role") == "tool" and MARKER in json.dumps(message.get("content")):
            return True
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                if block.get("type") == "tool_result" and MARKER in json.dumps(block.get("content")):
                    return True
    return False


def chat_model(recorded: Recorded) -> Script:
    usage = chat_usage(*CHAT_USAGE)
    if tool_output_seen(recorded):
        return chat_sse(chat_events(text=ANSWER, usage=usage))
    name, arguments = shell_call(recorded.body.get("tools", []))
    call = ToolCall(call_id="call_cch_1", name=name, arguments=json.dumps(arguments), pieces=4)
    return chat_sse(chat_events(tool_calls=[call], usage=usage))


def anthropic_model(recorded: Recorded) -> Script:
    prompt, completion = ANTHROPIC_USAGE
    if tool_output_seen(recorded):
        blocks, stop = text_block(0, ANSWER), "end_turn"
    else:
        name, arguments = shell_call(recorded.body.get("tools", []))
        blocks, stop = tool_use_block(0, "toolu_cch_1", name, arguments, chunks=4), "tool_use"
    return messages_sse([message_start(input_tokens=prompt), *blocks, message_delta(stop, completion), message_stop()])


async def start_translated_gateway(fake: FakeUpstream, run_dir: Path, api: str) -> RunningGateway:
    provider = ProviderConfig(name=api, base_url=fake.base_url, api=api, websocket="off")
    config = gateway_config(
        fake,
        providers=(provider,),
        keys=(ClientKey(name=KEY_NAME, key=CLIENT_KEY),),
        usage=UsageConfig(database="sqlite:///usage.sqlite3", flush_interval=0.2),
    )
    service = makeService(config, reactor, None, str(run_dir))
    service.startService()
    await service.when_listening()
    return RunningGateway(service)


@pytest.mark.parametrize("api", ["chat", "anthropic"])
@pytest_twisted.ensureDeferred
async def test_codex_runs_a_tool_round_trip_through_a_translated_provider(
    fake: FakeUpstream,
    codex_fixture: tuple[Path, str],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    api: str,
    record_property: Any,
) -> None:
    binary, version = codex_fixture
    record_property("codex_version", version)
    fake.default = chat_model if api == "chat" else anthropic_model
    running = await start_translated_gateway(fake, tmp_path, api)
    try:
        session = CodexSession(binary, tmp_path / "codex", running)
        finished = await session.exec(
            fake, RUN_TIMEOUT, prompt="Run the shell command that prints the marker, then tell me what it printed."
        )
        await running.service.ledger.flush()
        rows = usage_rows(tmp_path)
    finally:
        await running.stop()
    offered = [t.get("function", t).get("name") for t in (fake.requests[0].body.get("tools") or [])] if fake.requests else []
    context = (
        f"\n--- codex {version} via {api}: exit={finished.code}; tools offered upstream: {offered}"
        f"\n--- stdout:\n{finished.stdout}"
        f"\n--- stderr:\n{finished.stderr[-4000:]}\n--- upstream requests: "
        + json.dumps([{"path": r.path, "body": r.body} for r in fake.requests], indent=1)[:20000]
    )
    print(context)
    assert finished.code == 0, context
    assert ANSWER in finished.stdout, context
    # The fake asked for the command once and saw its output in the request after.
    generating = [r for r in fake.requests if r.path.endswith(("/chat/completions", "/messages"))]
    assert len(generating) == 2, context
    assert not tool_output_seen(generating[0]) and tool_output_seen(generating[1]), context
    # One ledger row per generating turn, with the tokens the fake reported.
    completed = [row for row in rows if row["status"] == "completed" and row["output_tokens"]]
    prompt, completion = CHAT_USAGE if api == "chat" else ANTHROPIC_USAGE
    assert len(completed) == 2, rows
    for row in completed:
        assert (row["provider"], row["input_tokens"], row["output_tokens"]) == (api, prompt, completion), row
    assert all(re.fullmatch(r"resp_[0-9a-f]{32}", row["response_id"]) for row in completed), rows
