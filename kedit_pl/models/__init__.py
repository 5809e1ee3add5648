"""Model specs, loading (embedded GGUF models, the hub, tiny random models) and architecture inference."""
