"""The registry's core: names, concepts and directions, the file format, the local store, evaluation records, errors, terminal-safe text and the environment settings."""
