"""kedit_pl: knowledge editing for transformer LMs with Lightning + Hydra."""
__version__ = "0.1.0"
