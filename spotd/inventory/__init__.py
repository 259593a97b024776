"""The controller's slim watch cache of nodes and pods: msgspec decoding (records) and the watches (cache)."""
