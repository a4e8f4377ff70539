"""docs/serve.md's field table says what the code's field tables say, endpoint by endpoint."""

import os
import re

from paddle_llm.serving.openai.chat.protocol import ChatProtocol
from paddle_llm.serving.openai.completions.protocol import CompletionsProtocol
from paddle_llm.serving.openai.protocol import REFUSED_FIELDS

PAGE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "serve.md")


def documented() -> dict[str, tuple[str, str]]:
    """field -> (its /v1/completions verdict, its /v1/chat/completions verdict)."""
    rows = {}
    with open(PAGE, encoding="utf-8") as page:
        for line in page:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) == 4 and cells[1] in ("honoured", "refused"):
                for name in re.findall(r"`([a-z_]+)`", cells[0]):
                    rows[name] = (cells[1], cells[2])
    return rows


def test_every_field_has_the_verdict_the_code_gives_it():
    rows = documented()
    for column, protocol in enumerate((CompletionsProtocol, ChatProtocol)):
        for name in protocol.fields():
            assert rows[name][column] == "honoured", f"{name} on {protocol.path}"
    for name, (completions, chat) in rows.items():
        for verdict, protocol in ((completions, CompletionsProtocol), (chat, ChatProtocol)):
            assert (verdict == "honoured") == (name in protocol.fields()), f"{name} on {protocol.path}"
    assert set(REFUSED_FIELDS) <= set(rows)
