"""Commands that drive the whole toolkit rather than one step of it: ``check`` (every pre-launch check),
``doctor`` (is this machine ready), ``selftest`` (a tiny twin of the planned run against one device, with
``equivalence``, the comparison the parallel tests share) and the ``demo``."""
