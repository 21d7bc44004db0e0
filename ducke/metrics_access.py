"""Access control for ``GET /metrics``: a client-network allowlist and/or a bearer token.

DUCKE_METRICS_ALLOWED_CIDRS  comma-separated CIDRs allowed to scrape; empty -> any address.
DUCKE_METRICS_TOKEN          bearer token a scraper must send; empty -> no token required.

When both are set, a scrape must satisfy both. The client address follows the quotas app's
rules (``QUOTAS_TRUSTED_PROXIES``), so a forged ``X-Forwarded-For`` from an untrusted peer
cannot reach the metrics. Settings are read on every request; a malformed CIDR list refuses
every scrape (and is reported by the ``ducke.E010`` system check).
"""

import hmac
import logging

from django.core.checks import Error, Tags, register
from django.http import HttpResponseForbidden
from django.views.decorators.http import require_GET
from django_prometheus.exports import ExportToDjangoView

from ducke.conf import ducke_settings
from quotas.clientip import parse_trusted_proxies
from quotas.middleware import request_client_address

logger = logging.getLogger("ducke.metrics_access")


def _address_allowed(request, cidrs):
    try:
        networks = parse_trusted_proxies(cidrs)
    except ValueError:
        logger.error("DUCKE_METRICS_ALLOWED_CIDRS is malformed; refusing every /metrics scrape")
        return False
    # The address itself, not the client's network: an allowed host must not let in its /64.
    address = request_client_address(request)
    if address is None:
        return False
    return any(address in net for net in networks if net.version == address.version)


def _token_allowed(request, token):
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


def metrics_allowed(request):
    """True when the request may read the metrics under the current settings."""
    cidrs = ducke_settings.METRICS_ALLOWED_CIDRS or ""
    token = ducke_settings.METRICS_TOKEN or ""
    if cidrs.strip() and not _address_allowed(request, cidrs):
        return False
    return not token or _token_allowed(request, token)


@require_GET
def metrics(request):
    """The Prometheus exposition, or 403 for a scraper outside the allowlist or without token."""
    if not metrics_allowed(request):
        # The body names neither the expected token nor the address we saw.
        return HttpResponseForbidden("Forbidden\n", content_type="text/plain")
    return ExportToDjangoView(request)


@register(Tags.security)
def check_metrics_access(app_configs, **kwargs):
    """Report a malformed DUCKE_METRICS_ALLOWED_CIDRS at start-up (ducke.E010)."""
    cidrs = ducke_settings.METRICS_ALLOWED_CIDRS or ""
    try:
        parse_trusted_proxies(cidrs)
    except ValueError as exc:
        return [
            Error(
                f"DUCKE_METRICS_ALLOWED_CIDRS has a bad value: {exc}",
                hint="Use comma-separated networks such as 10.0.0.0/8,127.0.0.1/32.",
                id="ducke.E010",
            )
        ]
    return []
