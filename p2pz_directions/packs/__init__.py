"""Packs and the Hub: publish / pull (`hub`), search, the pack schema, legacy `.pt` imports and exports."""
