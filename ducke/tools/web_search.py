"""Web search through the OpenAI Responses API with its ``web_search`` tool on gpt-5-mini.

OPENAI_API_KEY         bearer key; without it (and without a base-URL override) web search is
                       "not configured" and no request is made.
DUCKE_OPENAI_BASE_URL  base URL of the API, default https://api.openai.com/v1.

This calls ``POST /responses`` with httpx rather than the pinned ``openai`` SDK: one request
and two fields read back (answer text, usage) do not need the SDK's models, and httpx gives
the weather tools and this one the same timeout, size bound and error handling (the SDK
brings its own retries, timeout semantics and exception texts, which may echo request
details). The request carries ``store: false`` so the answer is not kept by OpenAI.
"""

import asyncio

from django.conf import settings

from ducke.conf import ducke_settings

from .arguments import parse_object, required_text
from .common import (
    ToolFailure,
    ToolUsage,
    fetch_json,
    http_client,
    setting_seconds,
    setting_url,
    timeout_failure,
)

SEARCH_MODEL = "gpt-5-mini"
TOOL_NAME = "web_search"  # the ToolPrice row of its per-call fee
CALL = "web_search_call"  # a Responses API output item: one billed search
SERVICE = "web search"
MAX_QUERY_CHARS = 300
MAX_ANSWER_CHARS = 1500
MAX_SOURCES = 5
INSTRUCTION = (
    "Search the web and answer in 2-3 short sentences that can be read aloud, "
    "naming the sources you used."
)

WEB_SEARCH_SCHEMA = {
    "type": "function",
    "name": "web_search",
    "description": (
        "Search the web for recent or factual information (news, documentation, releases) "
        "and get a short answer with sources."
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "description": "What to search for, as a short question or keywords.",
                "maxLength": MAX_QUERY_CHARS,
            }
        },
        "required": ["query"],
        "additionalProperties": False,
    },
}


def validate(arguments):
    """Checked arguments of ``web_search``."""
    values = parse_object(arguments, ("query",))
    return {"query": required_text(values, "query", MAX_QUERY_CHARS)}


def configured():
    """Whether a search can be sent: a key, or a base-URL override (a local gateway)."""
    key = str(getattr(settings, "OPENAI_API_KEY", "") or "").strip()
    override = str(ducke_settings.OPENAI_BASE_URL or "").strip()
    return bool(key or override)


async def web_search(query):
    """The answer to ``query`` with its sources, and the tokens it spent."""
    if not configured():
        raise ToolFailure(
            "Web search is not configured on this server.",
            reason="not configured",
            error="not_configured",
        )
    key = str(getattr(settings, "OPENAI_API_KEY", "") or "").strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = setting_url("OPENAI_BASE_URL") + "/responses"
    body = {
        "model": SEARCH_MODEL,
        "tools": [{"type": "web_search"}],
        "input": f"{query}\n\n{INSTRUCTION}",
        "store": False,
    }
    timeout = setting_seconds("WEB_SEARCH_TIMEOUT_SECONDS")
    try:
        async with asyncio.timeout(timeout), http_client(timeout) as client:
            reply = await fetch_json(
                client, "POST", url, json_body=body, headers=headers, service=SERVICE
            )
    except TimeoutError:
        raise timeout_failure(SERVICE) from None
    if not isinstance(reply, dict):
        raise ToolFailure(
            "The web search sent an answer I could not read; please try again later.",
            reason="unexpected response shape",
        )
    usage = response_usage(reply)
    text, sources = answer_and_sources(reply)
    if not text:
        raise ToolFailure(
            "The web search found no answer this time; please try a different question.",
            reason=f"no answer text (status {str(reply.get('status'))[:20]})",
            error="no_answer",
            usage=usage,
        )
    return {"query": query, "answer": trim(text, MAX_ANSWER_CHARS), "sources": sources}, usage


def response_usage(reply):
    """The ``ToolUsage`` of a Responses API reply: its tokens and its web search calls (each
    billed per call on top of the tokens); empty when it reports neither."""
    usage = reply.get("usage")
    output = reply.get("output")
    calls = 0
    if isinstance(output, list):
        calls = sum(1 for item in output if isinstance(item, dict) and item.get("type") == CALL)
    if not isinstance(usage, dict):
        if not calls:
            return ()
        usage = {}
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return (
        ToolUsage(
            # The model asked for, not the dated snapshot the reply names: prices are keyed
            # by the family name, and an unknown name is priced at the dearest rates.
            model=SEARCH_MODEL,
            input_tokens=_count(usage.get("input_tokens")),
            cached_input_tokens=_count(cached),
            output_tokens=_count(usage.get("output_tokens")),
            per_call_tool=TOOL_NAME,
            calls=calls,
        ),
    )


def _count(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def answer_and_sources(reply):
    """The concatenated ``output_text`` of the reply's messages and their cited sources."""
    texts, sources, seen = [], [], set()
    output = reply.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        content = item.get("content")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict) or part.get("type") != "output_text":
                continue
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            annotations = part.get("annotations")
            for note in annotations if isinstance(annotations, list) else ():
                if not isinstance(note, dict) or note.get("type") != "url_citation":
                    continue
                url = note.get("url")
                if not isinstance(url, str) or url in seen or len(sources) >= MAX_SOURCES:
                    continue
                seen.add(url)
                title = note.get("title") if isinstance(note.get("title"), str) else ""
                sources.append({"title": trim(title, 200), "url": url[:500]})
    return "".join(texts).strip(), sources


def trim(text, limit):
    """``text`` cut at a word boundary to at most ``limit`` characters, marked with an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"
