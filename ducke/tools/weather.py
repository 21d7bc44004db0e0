"""Current weather and forecasts from Open-Meteo (no API key).

DUCKE_GEOCODING_URL and DUCKE_WEATHER_URL (``ducke.conf``) are the base URLs of the two APIs.
A place is resolved with ``/v1/search``, then its weather read with ``/v1/forecast``; both
requests share the ``DUCKE_TOOL_TIMEOUT_SECONDS`` deadline.
"""

import asyncio

from .arguments import optional_choice, optional_integer, parse_object, required_text
from .common import (
    ToolFailure,
    fetch_json,
    http_client,
    setting_seconds,
    setting_url,
    timeout_failure,
)

SERVICE = "weather service"
MAX_LOCATION_CHARS = 100
DEFAULT_FORECAST_DAYS = 3
# A "Town, Region" query is resolved by fetching this many candidates for "Town".
QUALIFIED_CANDIDATES = 10

CURRENT_FIELDS = (
    "temperature_2m,apparent_temperature,relative_humidity_2m,wind_speed_10m,weather_code"
)
DAILY_FIELDS = (
    "weather_code,temperature_2m_max,temperature_2m_min,"
    "precipitation_probability_max,precipitation_sum,wind_speed_10m_max"
)

UNITS = {
    "celsius": {"temperature": "°C", "wind": "km/h", "precipitation": "mm"},
    "fahrenheit": {"temperature": "°F", "wind": "mph", "precipitation": "inch"},
}
_QUERY_UNITS = {
    "celsius": {
        "temperature_unit": "celsius",
        "wind_speed_unit": "kmh",
        "precipitation_unit": "mm",
    },
    "fahrenheit": {
        "temperature_unit": "fahrenheit",
        "wind_speed_unit": "mph",
        "precipitation_unit": "inch",
    },
}

# WMO weather interpretation codes, as Open-Meteo documents them.
WMO_CODES = {
    0: "clear sky",
    1: "mainly clear",
    2: "partly cloudy",
    3: "overcast",
    45: "fog",
    48: "depositing rime fog",
    51: "light drizzle",
    53: "moderate drizzle",
    55: "dense drizzle",
    56: "light freezing drizzle",
    57: "dense freezing drizzle",
    61: "slight rain",
    63: "moderate rain",
    65: "heavy rain",
    66: "light freezing rain",
    67: "heavy freezing rain",
    71: "slight snowfall",
    73: "moderate snowfall",
    75: "heavy snowfall",
    77: "snow grains",
    80: "slight rain showers",
    81: "moderate rain showers",
    82: "violent rain showers",
    85: "slight snow showers",
    86: "heavy snow showers",
    95: "thunderstorm",
    96: "thunderstorm with slight hail",
    99: "thunderstorm with heavy hail",
}

LOCATION_SCHEMA = {
    "type": "string",
    "description": "City or place name, optionally with region or country, e.g. 'Paris, France'.",
    "maxLength": MAX_LOCATION_CHARS,
}
UNITS_SCHEMA = {
    "type": "string",
    "enum": list(UNITS),
    "description": "Temperature unit; default celsius.",
}

CURRENT_WEATHER_SCHEMA = {
    "type": "function",
    "name": "get_current_weather",
    "description": "Get the current weather (conditions, temperature, wind, humidity) for a place.",
    "parameters": {
        "type": "object",
        "properties": {"location": LOCATION_SCHEMA, "units": UNITS_SCHEMA},
        "required": ["location"],
        "additionalProperties": False,
    },
}
FORECAST_SCHEMA = {
    "type": "function",
    "name": "get_weather_forecast",
    "description": "Get the daily weather forecast for a place for the next 1 to 7 days.",
    "parameters": {
        "type": "object",
        "properties": {
            "location": LOCATION_SCHEMA,
            "days": {
                "type": "integer",
                "minimum": 1,
                "maximum": 7,
                "description": f"Number of days including today; default {DEFAULT_FORECAST_DAYS}.",
            },
            "units": UNITS_SCHEMA,
        },
        "required": ["location"],
        "additionalProperties": False,
    },
}


def conditions(code):
    """Words for a WMO weather code ("unknown conditions" for a code we do not know)."""
    if isinstance(code, bool) or not isinstance(code, int | float):
        return "unknown conditions"
    return WMO_CODES.get(int(code), "unknown conditions")


def validate_current(arguments):
    """Checked arguments of ``get_current_weather``."""
    values = parse_object(arguments, ("location", "units"))
    return {
        "location": required_text(values, "location", MAX_LOCATION_CHARS),
        "units": optional_choice(values, "units", tuple(UNITS), "celsius"),
    }


def validate_forecast(arguments):
    """Checked arguments of ``get_weather_forecast``."""
    values = parse_object(arguments, ("location", "days", "units"))
    return {
        "location": required_text(values, "location", MAX_LOCATION_CHARS),
        "days": optional_integer(values, "days", 1, 7, DEFAULT_FORECAST_DAYS),
        "units": optional_choice(values, "units", tuple(UNITS), "celsius"),
    }


async def current_weather(location, units):
    """The JSON-ready current weather at ``location``."""
    return await _lookup(location, units, days=1, shape=_current_report)


async def weather_forecast(location, days, units):
    """The JSON-ready daily forecast for ``days`` days at ``location``."""
    return await _lookup(location, units, days=days, shape=_forecast_report)


async def _lookup(location, units, *, days, shape):
    timeout = setting_seconds("TOOL_TIMEOUT_SECONDS")
    try:
        async with asyncio.timeout(timeout), http_client(timeout) as client:
            place = await _find_place(client, location)
            if place is None:
                return {
                    "found": False,
                    "location_query": location,
                    "message": f"I could not find a place called {location}.",
                }
            forecast = await _forecast(client, place, units, days)
    except TimeoutError:
        raise timeout_failure(SERVICE) from None
    try:
        return shape(place, forecast, units)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ToolFailure(
            f"The {SERVICE} sent an answer I could not read; please try again later.",
            reason="unexpected forecast shape",
        ) from None


async def _find_place(client, location):
    name, _, qualifier = location.partition(",")
    name, qualifier = name.strip(), qualifier.strip().lower()
    if not name:
        return None
    params = {
        "name": name,
        "count": QUALIFIED_CANDIDATES if qualifier else 1,
        "language": "en",
        "format": "json",
    }
    url = setting_url("GEOCODING_URL") + "/v1/search"
    body = await fetch_json(client, "GET", url, params=params, service=SERVICE)
    if not isinstance(body, dict):
        raise ToolFailure(
            f"The {SERVICE} sent an answer I could not read; please try again later.",
            reason="unexpected geocoding shape",
        )
    results = body.get("results") or []
    if not isinstance(results, list):
        results = []
    for result in results:
        if not _usable_place(result):
            continue
        if not qualifier or _matches(result, qualifier):
            return result
    return None


def _usable_place(result):
    return (
        isinstance(result, dict)
        and isinstance(result.get("name"), str)
        and all(
            isinstance(result.get(k), int | float) and not isinstance(result.get(k), bool)
            for k in ("latitude", "longitude")
        )
    )


def _matches(result, qualifier):
    # "Paris, Texas" or "Paris, TX, USA": the first part after the comma must name the
    # region, country or country code, otherwise Paris (France) would answer for Paris (Texas).
    first = qualifier.split(",")[0].strip()
    names = {
        str(result.get(k) or "").strip().lower()
        for k in ("admin1", "admin2", "country", "country_code")
    }
    return first in names


async def _forecast(client, place, units, days):
    params = {
        "latitude": place["latitude"],
        "longitude": place["longitude"],
        "current": CURRENT_FIELDS,
        "daily": DAILY_FIELDS,
        "timezone": "auto",
        "forecast_days": days,
        **_QUERY_UNITS[units],
    }
    url = setting_url("WEATHER_URL") + "/v1/forecast"
    body = await fetch_json(client, "GET", url, params=params, service=SERVICE)
    if not isinstance(body, dict):
        raise TypeError("forecast is not an object")
    return body


def _place_name(place):
    parts = []
    for key in ("name", "admin1", "country"):
        value = place.get(key)
        if isinstance(value, str) and value and value not in parts:
            parts.append(value)
    return ", ".join(parts)


def _number(value):
    """A reading as a number, or None when the service has none; anything else is garbage."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("reading is not a number")
    return round(float(value), 1)


def _daily(forecast, units):
    daily = forecast["daily"]
    dates = daily["time"]
    if not isinstance(dates, list):
        raise TypeError("daily.time is not a list")

    def column(name):
        values = daily.get(name)
        return values if isinstance(values, list) else [None] * len(dates)

    codes = column("weather_code")
    highs, lows = column("temperature_2m_max"), column("temperature_2m_min")
    rain_chance, rain = column("precipitation_probability_max"), column("precipitation_sum")
    wind = column("wind_speed_10m_max")
    days = []
    for i, date in enumerate(dates):
        days.append(
            {
                "date": str(date),
                "conditions": conditions(codes[i]),
                "high": _number(highs[i]),
                "low": _number(lows[i]),
                "precipitation_probability_percent": _number(rain_chance[i]),
                "precipitation": _number(rain[i]),
                "max_wind_speed": _number(wind[i]),
            }
        )
    return days


def _current_report(place, forecast, units):
    now = forecast["current"]
    unit = UNITS[units]
    temperature = _number(now["temperature_2m"])
    if temperature is None:
        raise ValueError("no current temperature")
    feels_like = _number(now.get("apparent_temperature"))
    humidity = _number(now.get("relative_humidity_2m"))
    wind = _number(now.get("wind_speed_10m"))
    words = conditions(now.get("weather_code"))
    today = _daily(forecast, units)[:1] if "daily" in forecast else []
    summary = f"{words.capitalize()}, {temperature} {unit['temperature']}"
    if feels_like is not None:
        summary += f" (feels like {feels_like} {unit['temperature']})"
    if humidity is not None:
        summary += f", humidity {humidity:g} %"
    if wind is not None:
        summary += f", wind {wind} {unit['wind']}"
    report = {
        "found": True,
        "location": _place_name(place),
        "time": str(now.get("time", "")),
        "timezone": str(forecast.get("timezone", "")),
        "units": units,
        "temperature_unit": unit["temperature"],
        "wind_speed_unit": unit["wind"],
        "conditions": words,
        "temperature": temperature,
        "feels_like": feels_like,
        "humidity_percent": humidity,
        "wind_speed": wind,
        "summary": summary + ".",
    }
    if today:
        report["today"] = {"high": today[0]["high"], "low": today[0]["low"]}
    return report


def _forecast_report(place, forecast, units):
    unit = UNITS[units]
    return {
        "found": True,
        "location": _place_name(place),
        "timezone": str(forecast.get("timezone", "")),
        "units": units,
        "temperature_unit": unit["temperature"],
        "wind_speed_unit": unit["wind"],
        "precipitation_unit": unit["precipitation"],
        "days": _daily(forecast, units),
    }
