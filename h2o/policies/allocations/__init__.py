"""The built-in allocations, one module each (registered by `h2o.policies.allocation`, which imports them)."""
