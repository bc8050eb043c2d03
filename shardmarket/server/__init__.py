"""The node daemon: serves one layer range of a model over encrypted sessions and signs every result."""
