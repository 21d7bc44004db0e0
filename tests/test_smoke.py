import pytest


@pytest.mark.django_db
def test_status_reports_contract_fields(client, no_redis):
    response = client.get("/status")
    assert response.status_code == 200
    body = response.json()
    assert body["database"] == "ok"
    assert body["redis"] == "disabled"
    assert body["circuit_breaker"] in {"closed", "open", "half_open"}
    assert body["realtime_backend"] in {"openai", "simulator"}
    assert response["RateLimit-Limit"] == "60"
    assert response["RateLimit-Remaining"] == "59"


@pytest.mark.django_db
def test_status_61st_request_is_refused(client, no_redis):
    for _ in range(60):
        assert client.get("/status").status_code == 200
    response = client.get("/status")
    assert response.status_code == 429
    body = response.json()
    assert body["error"] == "rate_limited"
    assert body["limit"] == 60 and body["window_seconds"] == 60
    assert int(response["Retry-After"]) >= 1
