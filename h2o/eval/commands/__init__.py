"""The `h2o` commands, one module per command (named as it), each on the shared harness of `h2o.eval`."""
