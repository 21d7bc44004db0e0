"""The README's plain Django view example, served by the reuse project."""

from django.http import JsonResponse

import quotas


@quotas.ratelimit("search")  # a RateLimitRule: name "search", scope "view"
def search(request):
    return JsonResponse({"results": []})


def export(request):
    check = quotas.check(request, "exports")
    if not check.allowed:
        return JsonResponse({"wait": check.retry_after}, status=429)
    return JsonResponse({"left": check.remaining})


def status(request):
    return JsonResponse({"status": "ok"})
