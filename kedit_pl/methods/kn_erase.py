"""Moved to `kedit_pl.locate.kn_erase` (locate/ uses it, and locate/ sits below methods/); re-exported here."""
from kedit_pl.locate.kn_erase import erase_value_slots, relation_neurons, restore_weights  # noqa: F401
