"""Keys, value targets, key statistics and null spaces shared by ROME, MEMIT, EMMET and AlphaEdit."""
