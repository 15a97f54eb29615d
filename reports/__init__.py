"""prefixlab reports."""
