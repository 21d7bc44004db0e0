"""Server-side tools against fake Open-Meteo and Responses API servers on loopback."""

import json
import logging
import time
import uuid

import httpx
import pytest

from ducke.tools import TOOL_SCHEMAS, ToolOutcome, ToolUsage, run_tool
from ducke.tools.registry import TOOLS, about, per
from quotas.guards import check_tool_call
from tests.fixtures.fake_services import (  # noqa: F401
    PLACES,
    fake_responses_api,
    fake_weather,
)

SECRET = "sk-test-SECRET"


pytestmark = pytest.mark.usefixtures("close_worker_connections")


@pytest.fixture
def caller():
    """A client identity of its own, so counters never leak between tests or runs."""
    return f"203.0.113.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def weather_at(settings, fake_weather):
    """Point the weather tools at the fake Open-Meteo."""
    settings.DUCKE_GEOCODING_URL = fake_weather.base_url
    settings.DUCKE_WEATHER_URL = fake_weather.base_url + "/"  # a trailing slash is fine
    settings.DUCKE_TOOL_TIMEOUT_SECONDS = 2
    return fake_weather


@pytest.fixture
def search_at(settings, fake_responses_api):
    """Point web search at the fake Responses API with a recognisable key."""
    settings.DUCKE_OPENAI_BASE_URL = fake_responses_api.base_url
    settings.OPENAI_API_KEY = SECRET
    settings.DUCKE_WEB_SEARCH_TIMEOUT_SECONDS = 2
    return fake_responses_api


def parsed(outcome):
    assert isinstance(outcome, ToolOutcome)
    return json.loads(outcome.output)


def assert_clean(outcome):
    """No key, traceback, exception repr or upstream URL ever reaches the model."""
    for leak in (SECRET, "Traceback", "Error(", "http://127.0.0.1", "api.openai.com"):
        assert leak not in outcome.output


# --- schemas ---------------------------------------------------------------------------


def test_schemas_are_realtime_function_tools_run_tool_accepts():
    assert [s["name"] for s in TOOL_SCHEMAS] == [
        "get_current_weather",
        "get_weather_forecast",
        "web_search",
    ]
    assert set(TOOLS) == {s["name"] for s in TOOL_SCHEMAS}
    for schema in TOOL_SCHEMAS:
        assert set(schema) == {"type", "name", "description", "parameters"}
        assert schema["type"] == "function"
        assert isinstance(schema["description"], str) and 10 < len(schema["description"]) < 300
        parameters = schema["parameters"]
        assert parameters["type"] == "object"
        assert parameters["required"], schema["name"]
        assert set(parameters["required"]) <= set(parameters["properties"])
        for prop in parameters["properties"].values():
            assert prop["type"] in {"string", "integer"} and prop["description"]
        json.dumps(schema)  # sent as-is in session.update
    forecast = TOOL_SCHEMAS[1]["parameters"]["properties"]
    assert (forecast["days"]["minimum"], forecast["days"]["maximum"]) == (1, 7)
    assert forecast["units"]["enum"] == ["celsius", "fahrenheit"]


@pytest.mark.parametrize("name", ["get_time", "", "WEB_SEARCH", None])
async def test_unknown_tool(name, caller):
    outcome = await run_tool(name, '{"query": "x"}', client=caller)
    assert outcome.status == "unknown_tool"
    body = parsed(outcome)
    assert body["error"] == "unknown_tool"
    assert "get_current_weather" in body["message"]


# --- weather ---------------------------------------------------------------------------


@pytest.mark.django_db
async def test_current_weather_celsius(weather_at, caller, no_redis):
    outcome = await run_tool("get_current_weather", '{"location": "Berlin"}', client=caller)
    assert outcome.status == "ok" and outcome.usage == ()
    body = parsed(outcome)
    assert body["location"] == "Berlin, Land Berlin, Germany"
    assert body["conditions"] == "partly cloudy"
    assert body["temperature"] == 21.5 and body["feels_like"] == 20.0
    assert body["temperature_unit"] == "°C" and body["wind_speed_unit"] == "km/h"
    assert body["humidity_percent"] == 55 and body["wind_speed"] == 12.0
    assert body["today"] == {"high": 20.0, "low": 10.0}
    assert "21.5 °C" in body["summary"]

    [search] = weather_at.requests_to("/v1/search")
    assert search.query == {"name": "Berlin", "count": "1", "language": "en", "format": "json"}
    [forecast] = weather_at.requests_to("/v1/forecast")
    assert forecast.query["latitude"] == "52.52437" and forecast.query["longitude"] == "13.41053"
    assert forecast.query["current"].split(",") == [
        "temperature_2m",
        "apparent_temperature",
        "relative_humidity_2m",
        "wind_speed_10m",
        "weather_code",
    ]
    assert "temperature_2m_max" in forecast.query["daily"]
    assert forecast.query["timezone"] == "auto"
    assert forecast.query["forecast_days"] == "1"
    assert forecast.query["temperature_unit"] == "celsius"


@pytest.mark.django_db
async def test_current_weather_fahrenheit(weather_at, caller, no_redis):
    arguments = '{"location": "berlin", "units": "fahrenheit"}'
    body = parsed(await run_tool("get_current_weather", arguments, client=caller))
    assert body["temperature"] == 70.7 and body["temperature_unit"] == "°F"
    assert body["wind_speed_unit"] == "mph" and body["wind_speed"] == 7.5
    [forecast] = weather_at.requests_to("/v1/forecast")
    assert forecast.query["temperature_unit"] == "fahrenheit"
    assert forecast.query["wind_speed_unit"] == "mph"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "days"), [('{"location": "Berlin"}', 3), ('{"location": "Berlin", "days": 7}', 7)]
)
async def test_forecast(weather_at, caller, no_redis, arguments, days):
    outcome = await run_tool("get_weather_forecast", arguments, client=caller)
    assert outcome.status == "ok"
    body = parsed(outcome)
    assert body["location"] == "Berlin, Land Berlin, Germany"
    assert [d["date"] for d in body["days"]][:2] == ["2026-11-26", "2026-11-27"]
    assert len(body["days"]) == days
    expected = ["partly cloudy", "slight rain", "clear sky", "overcast", "thunderstorm"]
    expected += ["slight snowfall", "fog"]
    assert [d["conditions"] for d in body["days"]] == expected[:days]
    assert body["days"][1]["high"] == 21.0 and body["days"][1]["low"] == 11.0
    assert body["days"][1]["precipitation_probability_percent"] == 10
    [forecast] = weather_at.requests_to("/v1/forecast")
    assert forecast.query["forecast_days"] == str(days)


@pytest.mark.django_db
async def test_place_with_region_picks_the_matching_one(weather_at, caller, no_redis):
    outcome = await run_tool("get_current_weather", '{"location": "Paris, Texas"}', client=caller)
    body = parsed(outcome)
    assert body["location"] == "Paris, Texas, United States"
    [search] = weather_at.requests_to("/v1/search")
    assert search.query["name"] == "Paris" and search.query["count"] == "10"
    [forecast] = weather_at.requests_to("/v1/forecast")
    assert forecast.query["latitude"] == "33.66094"

    body = parsed(await run_tool("get_current_weather", '{"location": "Paris, FR"}', client=caller))
    assert body["location"] == "Paris, Île-de-France, France"


@pytest.mark.django_db
@pytest.mark.parametrize("place", ["Atlantis", "Paris, Narnia"])
async def test_place_not_found(weather_at, caller, no_redis, place):
    outcome = await run_tool("get_current_weather", json.dumps({"location": place}), client=caller)
    assert outcome.status == "ok"
    body = parsed(outcome)
    assert body["found"] is False
    assert body["message"] == f"I could not find a place called {place}."
    assert weather_at.requests_to("/v1/search") and not weather_at.requests_to("/v1/forecast")


@pytest.mark.django_db
async def test_geocoding_without_results_key(weather_at, caller, no_redis):
    weather_at.path_modes["/v1/search"] = "no_results"
    body = parsed(await run_tool("get_weather_forecast", '{"location": "Berlin"}', client=caller))
    assert body["found"] is False and "Berlin" in body["message"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "mode"),
    [
        ("/v1/search", "error"),
        ("/v1/forecast", "error"),
        ("/v1/search", "garbage"),
        ("/v1/forecast", "garbage"),
    ],
)
async def test_weather_upstream_failure_is_polite(weather_at, caller, no_redis, path, mode):
    weather_at.path_modes[path] = mode
    started = time.monotonic()
    outcome = await run_tool("get_current_weather", '{"location": "Berlin"}', client=caller)
    assert time.monotonic() - started < 1.5
    assert outcome.status == "failed"
    body = parsed(outcome)
    assert body["error"] == "upstream_unavailable"
    assert body["message"].startswith("The weather service is not answering properly")
    assert_clean(outcome)


@pytest.mark.django_db
async def test_weather_forecast_of_wrong_shape_fails(weather_at, caller, no_redis):
    weather_at.answer = lambda request, mode: (
        (200, {"results": PLACES[:1]})
        if request.path == "/v1/search"
        else (200, {"current": {"temperature_2m": "warm"}, "daily": {"time": 3}})
    )
    outcome = await run_tool("get_current_weather", '{"location": "Berlin"}', client=caller)
    assert outcome.status == "failed"
    assert "could not read" in parsed(outcome)["message"]


@pytest.mark.django_db
@pytest.mark.parametrize("slow_path", ["/v1/search", "/v1/forecast"])
async def test_weather_timeout_fails_quickly(settings, weather_at, caller, no_redis, slow_path):
    settings.DUCKE_TOOL_TIMEOUT_SECONDS = 0.3
    weather_at.path_modes[slow_path] = "slow"
    weather_at.delay = 5
    started = time.monotonic()
    outcome = await run_tool("get_weather_forecast", '{"location": "Berlin"}', client=caller)
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 1.5  # far below the fake's 5 s delay
    assert outcome.status == "failed"
    body = parsed(outcome)
    assert body["error"] == "timeout"
    assert body["message"] == (
        "The weather service took too long to answer; please try again in a little while."
    )


# --- invalid arguments -----------------------------------------------------------------

INVALID_CALLS = [
    ("get_current_weather", "{not json", "not valid JSON"),
    ("get_current_weather", "[]", "JSON object"),
    ("get_current_weather", "[" * 3000, "not valid JSON"),
    ("get_current_weather", "{}", "'location' is required"),
    ("get_current_weather", '{"location": "   "}', "must not be empty"),
    ("get_current_weather", '{"location": 42}', "must be a string"),
    ("get_current_weather", json.dumps({"location": "x" * 101}), "at most 100"),
    ("get_current_weather", '{"location": "Berlin", "units": "kelvin"}', "'celsius' or"),
    ("get_current_weather", '{"location": "Berlin", "country": "DE"}', "Unknown argument"),
    ("get_current_weather", '{"location": "Ber\\u0000lin"}', "control characters"),
    ("get_weather_forecast", '{"location": "Berlin", "days": 0}', "from 1 to 7"),
    ("get_weather_forecast", '{"location": "Berlin", "days": 99}', "from 1 to 7"),
    ("get_weather_forecast", '{"location": "Berlin", "days": "3"}', "from 1 to 7"),
    ("get_weather_forecast", '{"location": "Berlin", "days": true}', "from 1 to 7"),
    ("get_weather_forecast", '{"location": "Berlin", "days": 2.5}', "from 1 to 7"),
    ("web_search", "{}", "'query' is required"),
    ("web_search", json.dumps({"query": "q" * 301}), "at most 300"),
    ("web_search", "x" * 5000, "far too long"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "arguments", "hint"), INVALID_CALLS)
async def test_invalid_arguments(weather_at, search_at, caller, no_redis, name, arguments, hint):
    outcome = await run_tool(name, arguments, client=caller)
    assert outcome.status == "invalid"
    body = parsed(outcome)
    assert body["error"] == "invalid_arguments"
    assert hint in body["message"]
    assert weather_at.requests == [] and search_at.requests == []
    # No quota was used: the next counted call is the first one in the window.
    target = TOOLS[name].target
    decision = await check_tool_call(target, caller)
    assert decision.allowed and decision.states[0].hits == 1


@pytest.mark.django_db
async def test_limits_at_the_boundary_are_accepted(weather_at, caller, no_redis):
    arguments = json.dumps({"location": "  Berlin ", "days": 7, "units": None})
    assert (await run_tool("get_weather_forecast", arguments, client=caller)).status == "ok"
    arguments = json.dumps({"location": "a" * 100, "days": 1})
    outcome = await run_tool("get_weather_forecast", arguments, client=caller)
    assert outcome.status == "ok" and parsed(outcome)["found"] is False


# --- rate limits -----------------------------------------------------------------------


async def exhaust_weather(caller):
    for i in range(10):
        name = "get_current_weather" if i % 2 else "get_weather_forecast"
        outcome = await run_tool(name, '{"location": "Berlin"}', client=caller)
        assert outcome.status == "ok", (i, outcome)


async def assert_weather_limit(weather_at, search_at, caller):
    await exhaust_weather(caller)
    requests_before = len(weather_at.requests)
    outcome = await run_tool("get_current_weather", '{"location": "Berlin"}', client=caller)
    assert outcome.status == "refused"
    body = parsed(outcome)
    assert body["error"] == "rate_limited"
    assert body["message"] == (
        "I can only look up the weather 10 times an hour for you; try again in about an hour."
    )
    assert 3500 <= body["retry_after_seconds"] <= 3600
    assert len(weather_at.requests) == requests_before  # a refused call never goes out
    # The forecast shares the weather rule; another client and web search are unaffected.
    forecast = await run_tool("get_weather_forecast", '{"location": "Berlin"}', client=caller)
    assert forecast.status == "refused"
    other = await run_tool("get_current_weather", '{"location": "Berlin"}', client=caller + "x")
    assert other.status == "ok"
    search = await run_tool("web_search", '{"query": "python release"}', client=caller)
    assert search.status == "ok"


@pytest.mark.django_db
async def test_eleventh_weather_call_is_refused(weather_at, search_at, caller, no_redis):
    await assert_weather_limit(weather_at, search_at, caller)


@pytest.mark.redis
@pytest.mark.django_db
async def test_eleventh_weather_call_is_refused_on_redis(weather_at, search_at, caller, use_redis):
    await assert_weather_limit(weather_at, search_at, caller)
    decision = await check_tool_call("weather", caller)
    assert decision.engine == "redis" and not decision.allowed


@pytest.mark.django_db
async def test_sixth_web_search_is_refused(weather_at, search_at, caller, no_redis):
    for _ in range(5):
        assert (await run_tool("web_search", '{"query": "q"}', client=caller)).status == "ok"
    outcome = await run_tool("web_search", '{"query": "q"}', client=caller)
    assert outcome.status == "refused" and outcome.usage == ()
    assert parsed(outcome)["message"].startswith("I can only search the web 5 times an hour")
    assert len(search_at.requests) == 5
    weather = await run_tool("get_current_weather", '{"location": "Berlin"}', client=caller)
    assert weather.status == "ok"


async def test_quotas_disabled_means_no_limit(settings, weather_at, caller):
    settings.QUOTAS_ENABLED = False  # no database needed either: nothing is counted
    for _ in range(12):
        outcome = await run_tool("get_current_weather", '{"location": "Berlin"}', client=caller)
        assert outcome.status == "ok"


@pytest.mark.django_db
async def test_a_broken_limiter_fails_the_call_not_the_session(
    weather_at, caller, monkeypatch, caplog
):
    async def broken(*args, **kwargs):
        raise RuntimeError(f"database on fire, key {SECRET}")

    monkeypatch.setattr("ducke.tools.registry.check_tool_call", broken)
    with caplog.at_level(logging.INFO, logger="ducke.tools"):
        outcome = await run_tool("get_current_weather", '{"location": "Berlin"}', client=caller)
    assert outcome.status == "failed"
    assert parsed(outcome)["error"] == "internal_error"
    assert_clean(outcome)
    assert "fire" not in outcome.output
    assert weather_at.requests == []
    logged = caplog.text
    assert "RuntimeError at test_tools.py:" in logged
    assert "failed (error RuntimeError)" in logged
    assert SECRET not in logged and "fire" not in logged


def test_wait_and_window_in_words():
    assert per(3600) == "an hour" and per(60) == "a minute" and per(86400) == "a day"
    assert (
        per(7200) == "every 2 hours"
        and per(300) == "every 5 minutes"
        and per(45) == ("every 45 seconds")
    )
    assert about(1) == "about a second" and about(40) == "about 40 seconds"
    assert about(61) == "about 2 minutes" and about(720) == "about 12 minutes"
    assert about(3599) == "about an hour" and about(7300) == "about 2 hours"


# --- web search ------------------------------------------------------------------------


@pytest.mark.django_db
async def test_web_search(search_at, caller, no_redis):
    outcome = await run_tool("web_search", '{"query": "latest python release"}', client=caller)
    assert outcome.status == "ok"
    body = parsed(outcome)
    assert body["query"] == "latest python release"
    assert body["answer"] == search_at.answer_text
    assert body["sources"] == [{"title": "Welcome to Python.org", "url": "https://www.python.org/"}]
    assert outcome.usage == (
        ToolUsage(
            model="gpt-5-mini",
            input_tokens=8123,
            cached_input_tokens=1024,
            output_tokens=345,
            per_call_tool="web_search",
            calls=1,  # one web_search_call item: billed per call on top of the tokens
        ),
    )
    [request] = search_at.requests
    assert request.method == "POST" and request.path == "/v1/responses"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    sent = request.json()
    assert sent["model"] == "gpt-5-mini"
    assert sent["tools"] == [{"type": "web_search"}]
    assert sent["input"].startswith("latest python release")
    assert "2-3" in sent["input"]
    assert_clean(outcome)


@pytest.mark.django_db
async def test_web_search_answer_is_trimmed(search_at, caller, no_redis):
    search_at.answer_text = "word " * 1000
    body = parsed(await run_tool("web_search", '{"query": "q"}', client=caller))
    assert 1000 < len(body["answer"]) <= 1500 and body["answer"].endswith("…")


@pytest.mark.django_db
async def test_web_search_without_key_is_not_configured(settings, caller, no_redis, monkeypatch):
    settings.OPENAI_API_KEY = ""
    settings.DUCKE_OPENAI_BASE_URL = ""
    sent = []

    async def record(self, request, **kwargs):
        sent.append(request)
        raise httpx.ConnectError("no network in this test")

    monkeypatch.setattr(httpx.AsyncClient, "send", record)
    outcome = await run_tool("web_search", '{"query": "q"}', client=caller)
    assert outcome.status == "failed"
    body = parsed(outcome)
    assert body == {
        "error": "not_configured",
        "message": "Web search is not configured on this server.",
    }
    assert sent == []


@pytest.mark.django_db
@pytest.mark.parametrize("mode", ["error", "garbage", "slow"])
async def test_web_search_upstream_failure(settings, search_at, caller, no_redis, mode):
    settings.DUCKE_WEB_SEARCH_TIMEOUT_SECONDS = 0.3
    search_at.mode = mode
    search_at.delay = 5
    started = time.monotonic()
    outcome = await run_tool("web_search", '{"query": "q"}', client=caller)
    assert time.monotonic() - started < 1.5
    assert outcome.status == "failed" and outcome.usage == ()
    body = parsed(outcome)
    assert body["error"] == ("timeout" if mode == "slow" else "upstream_unavailable")
    assert body["message"].startswith("The web search")
    assert_clean(outcome)
    assert search_at.requests[0].headers["authorization"] == f"Bearer {SECRET}"


@pytest.mark.django_db
async def test_web_search_without_answer_still_reports_usage(search_at, caller, no_redis):
    search_at.mode = "no_results"
    outcome = await run_tool("web_search", '{"query": "q"}', client=caller)
    assert outcome.status == "failed"
    assert parsed(outcome)["error"] == "no_answer"
    assert outcome.usage[0].input_tokens == 8123  # tokens were spent; the meter must book them


@pytest.mark.django_db
async def test_log_lines_name_tool_status_and_no_key(search_at, caller, no_redis, caplog):
    search_at.mode = "error"
    with caplog.at_level(logging.INFO, logger="ducke.tools"):
        await run_tool("web_search", '{"query": "q"}', client=caller)
        await run_tool("no_such_tool" * 50, "{}", client=caller)
    lines = [r.getMessage() for r in caplog.records if r.name == "ducke.tools"]
    assert len(lines) == 2
    assert lines[0].startswith("tool web_search: failed (http 500) in ")
    assert lines[1].startswith("tool (unknown): unknown_tool in ")
    assert all(SECRET not in line and len(line) < 200 for line in lines)
