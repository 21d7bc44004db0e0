"""A Django middleware that writes one line per request it sees (edge tests under daphne)."""

import os


class CountingMiddleware:
    """First in MIDDLEWARE: a request that reaches Django at all is counted."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.path = os.environ["EDGE_PROBE_FILE"]

    def __call__(self, request):
        with open(self.path, "a") as probe:
            probe.write(f"{request.path}\n")
        return self.get_response(request)
