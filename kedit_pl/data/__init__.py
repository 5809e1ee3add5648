"""Edit requests (`EditRequest`), dataset readers and selection, and the Lightning data module."""
