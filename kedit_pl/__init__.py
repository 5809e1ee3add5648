"""kedit_pl: knowledge editing for transformer LMs with Lightning + Hydra."""
__version__ = "0.1.0"

__all__ = ["Editor"]


def __getattr__(name: str):
    """`from kedit_pl import Editor` without importing torch/transformers for every `import kedit_pl.x`."""
    if name == "Editor":
        from kedit_pl.api import Editor

        return Editor
    raise AttributeError(f"module 'kedit_pl' has no attribute {name!r}")
