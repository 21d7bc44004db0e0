"""The DUCK-E page: renders, ships its own assets, says when the simulator answers."""

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.test import override_settings

from tests.fixtures import live_server

daphne_server_factory = live_server.daphne_server_factory

STATIC_DIR = Path(__file__).resolve().parents[1] / "ducke" / "static" / "ducke"
ASSET_PATTERN = re.compile(r'(?:src|href|data-[a-z-]+-worklet)="(/static/[^"]+)"')
EXTERNAL_URL = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.IGNORECASE)
# XML namespace names look like URLs but are identifiers, never fetched.
NAMESPACE_NAMES = ("http://www.w3.org/2000/svg",)
SIMULATOR_NOTICE = 'id="simulator-notice"'


def page_html(client):
    response = client.get("/")
    assert response.status_code == 200
    return response.content.decode()


@pytest.mark.django_db
def test_page_renders_start_button_and_live_regions(client, no_redis):
    html = page_html(client)
    assert re.search(r'<button id="start" type="button"[^>]*>Start talking</button>', html)
    assert 'id="ducke"' in html and 'data-state="idle"' in html
    assert 'data-session-path="/session"' in html
    assert re.search(r'id="transcript"[^>]*aria-live="polite"', html)
    assert re.search(r'id="banner-error"[^>]*role="alert"', html)
    assert re.search(r'<label for="voice">', html) and re.search(r'<label for="question">', html)


@pytest.mark.django_db
def test_every_static_asset_on_the_page_is_found(client, no_redis):
    html = page_html(client)
    urls = set(ASSET_PATTERN.findall(html))
    expected = {
        "ducke/app.js",
        "ducke/style.css",
        "ducke/duck.svg",
        "ducke/audio-capture-worklet.js",
        "ducke/audio-playback-worklet.js",
    }
    prefix = "/" + settings.STATIC_URL.lstrip("/")
    relative = {url.removeprefix(prefix) for url in urls}
    assert relative == expected
    for path in relative:
        assert finders.find(path), f"{path} is referenced by the page but not found"


@pytest.mark.django_db
@override_settings(OPENAI_API_KEY="")
def test_simulator_notice_without_a_key(client, no_redis):
    html = page_html(client)
    assert SIMULATOR_NOTICE in html
    assert "Simulator mode" in html
    assert 'data-simulator="true"' in html


@pytest.mark.django_db
@override_settings(OPENAI_API_KEY="sk-test-not-a-real-key")
def test_no_simulator_notice_with_a_key(client, no_redis):
    html = page_html(client)
    assert SIMULATOR_NOTICE not in html
    assert "Simulator mode" not in html
    assert 'data-simulator="false"' in html
    assert "sk-test-not-a-real-key" not in html


@pytest.mark.django_db
def test_page_and_assets_fetch_nothing_from_elsewhere(client, no_redis):
    texts = {"/": page_html(client)}
    for path in sorted(STATIC_DIR.iterdir()):
        texts[path.name] = path.read_text()
    assert {"app.js", "style.css", "audio-capture-worklet.js"} <= set(texts)
    for name, text in texts.items():
        for namespace in NAMESPACE_NAMES:
            text = text.replace(namespace, "")
        found = EXTERNAL_URL.findall(text)
        assert not found, f"{name} refers to {found}"
        assert "@import" not in text and "@font-face" not in text, name


def test_script_speaks_the_ga_protocol_and_explains_every_close_code():
    script = (STATIC_DIR / "app.js").read_text()
    for event in (
        "input_audio_buffer.speech_started",
        "conversation.item.input_audio_transcription.completed",
        "response.output_audio.delta",
        "response.output_audio_transcript.delta",
        "response.done",
        "quota.status",
        "quota.warning",
        "quota.exceeded",
    ):
        assert f'"{event}"' in script, event
    # Beta event names no longer exist on the GA endpoint.
    assert '"response.audio.delta"' not in script
    for code in (4429, 4402, 4408, 4503, 1009, 1011):
        assert re.search(rf"^\s+{code}: \"[^\"]{{20,}}\",$", script, re.MULTILINE), code


def test_daphne_fixture_serves_page_and_assets_then_stops(daphne_server_factory):
    server = daphne_server_factory(DUCKE_SIMULATOR_ENABLED="0", DJANGO_DEBUG="0")
    with urllib.request.urlopen(f"{server.url}/") as response:
        html = response.read().decode()
    assert 'id="start"' in html
    for asset in ASSET_PATTERN.findall(html):
        with urllib.request.urlopen(f"{server.url}{asset}") as response:
            assert response.status == 200 and response.read(), asset
    with urllib.request.urlopen(f"{server.url}/status") as response:
        assert json.load(response)["realtime_backend"] == "simulator"
    assert "OPENAI_API_KEY" not in server.env and "REDIS_URL" not in server.env
    server.stop()
    assert server.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
