"""``/v1/models``: ``protocol`` (the list shape) and ``router`` (the route)."""
