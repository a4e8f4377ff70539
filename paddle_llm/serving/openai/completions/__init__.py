"""``/v1/completions``: ``protocol`` (request and response shapes) and ``router`` (the route)."""
