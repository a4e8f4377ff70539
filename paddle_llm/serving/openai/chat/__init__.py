"""``/v1/chat/completions``: ``protocol`` (request and response shapes) and ``router`` (the route)."""
