"""The chat template a GGUF carries: the release's, rewritten to render string message content too.

MiniMax-M1's template (tokenizer_config.json) reads every message's content as a list of parts:
`message['content'][0]['text']` for system and user, the text parts for the assistant, `content['name']` and
`content['text']` of each part for a tool. Clients that pass OpenAI-style plain strings (llama.cpp's server,
mlx-lm, most chat UIs) get `'abc'[0]['text']`: an error or, in lenient engines, the text silently dropped.
`string_content_template` rewrites exactly those reads so that a string content renders as its text and a list
renders as it did (the same prompt, character for character, for list content). The rewrites are data (`REWRITES`:
the release's text -> the new text); a template without them is returned unchanged, and one that still reads the
content as a list after them is reported (None) so the caller can warn.
"""

from __future__ import annotations

# The release's reads of the content (as they appear in tokenizer_config.json) -> reads that take a string too.
REWRITES: tuple[tuple[str, str], ...] = (
    ("message['content'][0]['text']",
     "(message['content'] if message['content'] is string else message['content'][0]['text'])"),
    ("{% for content in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ content['text'] -}}"
     "{%- endfor -%}",
     "{% if message['content'] is string -%}{{ message['content'] -}}{% else -%}"
     "{% for content in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ content['text'] -}}"
     "{%- endfor -%}{%- endif -%}"),
    ("{%- for content in message['content'] -%}{{- 'tool name: ' + content['name'] + '\n' + 'tool result: ' + "
     "content['text'] + '\n\n' -}} {%- endfor -%}",
     "{%- if message['content'] is string -%}{{- 'tool name: ' + (message['name'] or 'tool') + '\n' + "
     "'tool result: ' + message['content'] + '\n\n' -}}{%- else -%}"
     "{%- for content in message['content'] -%}{{- 'tool name: ' + content['name'] + '\n' + 'tool result: ' + "
     "content['text'] + '\n\n' -}} {%- endfor -%}{%- endif -%}"),
)
# What still marks a template that reads the content as a list only (after the rewrites).
LIST_ONLY_MARKERS = ("['content'][0]['text']", '["content"][0]["text"]', "content[0].text",
                     "message['content'] | selectattr('type'")


def reads_list_only(template: str) -> bool:
    """Whether the template indexes message content as a list of parts somewhere without a string branch."""
    rest = template
    for _, new in REWRITES:
        rest = rest.replace(new, "")
    return any(marker in rest for marker in LIST_ONLY_MARKERS)


def string_content_template(template: str) -> str | None:
    """The template with the release's list-only content reads rewritten to take a string too; None when a
    list-only read is left that this table does not know (the caller then keeps the template and warns)."""
    out = template
    for old, new in REWRITES:
        if new not in out:
            out = out.replace(old, new)
    return None if reads_list_only(out) else out
