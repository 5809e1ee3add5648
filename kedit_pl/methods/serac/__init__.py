"""SERAC (Mitchell et al., ICML 2022, "Memory-Based Model Editing at Scale"): edit memory, scope classifier,
counterfactual model. `Serac` is the method class (`_target_: kedit_pl.methods.serac.Serac`)."""
from kedit_pl.methods.serac.method import MemoryHandle, Serac

__all__ = ["Serac", "MemoryHandle"]
