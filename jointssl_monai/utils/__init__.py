"""Small shared utilities (distributed helpers, I/O)."""
