"""prefixlab probes."""
