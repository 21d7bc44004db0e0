"""Fault modes for failure tests, chosen per connection (`fault=` in the query string).

- ``reject``: the transport refuses the WebSocket handshake (403); no simulator runs.
- ``close_after_created``: the connection closes (1011) right after `session.created`.
- ``close_mid_response``: the connection closes (1011) after the first audio delta of the
  session's first response.
- ``ignore_max_output_tokens``: an upstream that streams past the session's output bound (the
  relay's in-flight cutoff is the second line against it).
"""

REJECT = "reject"
CLOSE_AFTER_CREATED = "close_after_created"
CLOSE_MID_RESPONSE = "close_mid_response"
IGNORE_MAX_OUTPUT_TOKENS = "ignore_max_output_tokens"
FAULTS = frozenset({"", REJECT, CLOSE_AFTER_CREATED, CLOSE_MID_RESPONSE, IGNORE_MAX_OUTPUT_TOKENS})
