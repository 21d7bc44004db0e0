"""Two daphne instances sharing Redis and PostgreSQL hold one set of limits, caps and policies."""

import asyncio
import re
import time
from decimal import Decimal

import httpx
import pytest

from tests.integration.conftest import ADMIN_PASSWORD, ADMIN_USER
from tests.integration.harness import Refused, Session, random_ip, try_open

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]


@pytest.fixture
def cluster(cluster_factory, redis_server, budget):
    budget(max_concurrent_sessions_per_client=10)
    return cluster_factory(redis_server.url)


async def test_connection_rate_limit_holds_across_instances(cluster):
    a, b = cluster.instances
    client = random_ip()
    outcomes = []
    for number in range(7):
        server = (a, b)[number % 2]
        kind, result = await try_open(server, client)
        if kind == "ok":
            await result.close()
        outcomes.append((kind, result))
    kinds = [kind for kind, _ in outcomes]
    assert kinds == ["ok"] * 5 + ["refused"] * 2, kinds
    for _, refused in outcomes[5:]:
        assert refused.code == 4429
        assert refused.event["type"] == "quota.exceeded"
        assert refused.event["reason"] == "rate_limited"
        assert refused.event["retry_after"] >= 1
    # Another client is not affected, on either instance.
    for server in (a, b):
        session = await Session.open(server)
        await session.close()


async def test_hourly_cap_and_breaker_hold_across_instances(cluster, it_database):
    a, b = cluster.instances
    # Rolling-hour cap: one response on A spends the hour (the cap is set to what it spent:
    # each answer is reserved at its worst case, so a cap below one answer admits none);
    # B refuses new sessions, A too.
    first = await Session.open(a)
    done = await first.turn()
    assert done["response"]["status"] in ("completed", "incomplete")
    await first.close()
    [(spent,)] = it_database.rows(
        "SELECT COALESCE(SUM(cost_usd), 0) FROM quotas_usagerecord "
        "WHERE created_at > now() - interval '1 hour'"
    )
    it_database.set_budget(hourly_cap_usd=str(spent))
    await asyncio.sleep(1.0)  # the policy refresh (0.5 s) on both
    for server in (b, a):
        with pytest.raises(Refused) as refused:
            await Session.open(server)
        assert refused.value.code == 4503
        assert refused.value.event["reason"] == "hourly_cap"

    # Breaker: a session on A trips it; the session on B ends with 4503 too.
    # (A session meters against the budget it started with: set the threshold first. The
    # hour holds one response already, but the breaker opens only on a charge.)
    it_database.set_budget(hourly_cap_usd="50.00", breaker_threshold_usd="0.05")
    await asyncio.sleep(1.0)
    on_a = await Session.open(a)
    on_b = await Session.open(b)
    started = time.monotonic()
    await on_a.ask()
    code_a, code_b = await asyncio.gather(on_a.wait_closed(30), on_b.wait_closed(30))
    elapsed = time.monotonic() - started
    assert (code_a, code_b) == (4503, 4503), (
        [e["type"] for e in on_a.events][-8:],
        on_b.events[-3:],
        a.log_tail(3000),
        b.log_tail(3000),
    )
    exceeded_b = [e for e in on_b.events if e["type"] == "quota.exceeded"]
    assert exceeded_b and exceeded_b[-1]["reason"] == "breaker"
    for server in (a, b):
        with pytest.raises(Refused) as refused:
            await Session.open(server)
        assert refused.value.code == 4503
        assert refused.value.event["reason"] == "breaker"
    print(f"\nbreaker: both sessions ended {elapsed:.2f}s after the question on A")


def admin_client(server):
    """An httpx client logged in to the admin of ``server`` as the run's superuser."""
    client = httpx.Client(base_url=server.url, headers={"X-Forwarded-For": random_ip()}, timeout=10)
    page = client.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    response = client.post(
        "/admin/login/",
        data={
            "csrfmiddlewaretoken": token,
            "username": ADMIN_USER,
            "password": ADMIN_PASSWORD,
            "next": "/admin/",
        },
    )
    assert response.status_code == 302, response.text[:500]
    return client


def page_limit(server):
    response = httpx.get(f"{server.url}/", headers={"X-Forwarded-For": random_ip()}, timeout=5)
    assert response.status_code == 200
    return int(response.headers["RateLimit-Limit"])


def test_policy_saved_on_one_instance_is_enforced_by_the_other_within_a_second(
    cluster, it_database
):
    a, b = cluster.instances
    (rule_id,) = it_database.rows("SELECT id FROM quotas_ratelimitrule WHERE name = 'page'")[0]
    assert page_limit(b) == 30
    admin = admin_client(a)
    form = admin.get(f"/admin/quotas/ratelimitrule/{rule_id}/change/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    try:
        response = admin.post(
            f"/admin/quotas/ratelimitrule/{rule_id}/change/",
            data={
                "csrfmiddlewaretoken": token,
                "name": "page",
                "scope": "http",
                "target": "/",
                "key": "ip",
                "limit": "3",
                "window_seconds": "60",
                "enabled": "on",
                "_save": "Save",
            },
        )
        saved = time.monotonic()
        assert response.status_code == 302, response.text[-2000:]
        while page_limit(b) != 3:
            assert time.monotonic() - saved < 3, "B still enforces the old limit after 3 s"
            time.sleep(0.02)
        propagation = time.monotonic() - saved
        print(f"\npolicy propagation A(admin save) -> B(enforced): {propagation * 1000:.0f} ms")
        assert propagation < 1.0
        # Enforced, not only announced: the 4th request of one client on B is refused.
        client = random_ip()
        codes = [
            httpx.get(f"{b.url}/", headers={"X-Forwarded-For": client}).status_code
            for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
    finally:
        admin.close()
        it_database.set_rule("page", limit=30)


async def test_session_cap_overshoot_stays_within_a_second_of_audio(cluster, it_database):
    a, _ = cluster.instances
    cap = Decimal("0.20")
    # The scaled policy: a $0.20 session bounds each answer to 200 output tokens
    # (at 1,000 the output bound alone, $0.20, leaves no answer room under the cap).
    it_database.set_budget(session_cap_usd=str(cap), max_output_tokens_per_response=200)
    await asyncio.sleep(1.0)
    session = await Session.open(a)
    turns = 0
    while session.close_code is None and turns < 20:
        await session.turn()
        turns += 1
    code = await session.wait_closed(20)
    ((cost,),) = it_database.rows(
        "SELECT cost_usd FROM quotas_quotasession WHERE client = %s", (session.client_ip,)
    )
    (audio_output,) = it_database.rows(
        "SELECT audio_output FROM quotas_modelprice WHERE model = 'gpt-realtime' "
        "ORDER BY effective_from DESC LIMIT 1"
    )[0]
    # One second of output audio: 20 tokens at the audio output price per 1M tokens.
    bound = audio_output * 20 / Decimal(1_000_000)
    overshoot = cost - cap
    last = it_database.rows(
        "SELECT r.cost_usd, r.text_input, r.cached_text_input, r.audio_input, "
        "r.cached_audio_input, r.text_output, r.audio_output FROM quotas_usagerecord r "
        "JOIN quotas_quotasession s ON s.id = r.session_id WHERE s.client = %s "
        "ORDER BY r.created_at DESC LIMIT 1",
        (session.client_ip,),
    )[0]
    print(
        f"\nlast response: cost, text in, cached text in, audio in, cached audio in, "
        f"text out, audio out = {last}"
    )
    print(
        f"\nsession cap ${cap}: closed {code} after {turns} questions at ${cost}, "
        f"overshoot ${overshoot} vs bound ${bound} (1 s of output audio)"
    )
    assert code == 4402
    assert overshoot <= bound
