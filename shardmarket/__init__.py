"""shardmarket: serve and use slices of large language models for pay."""

__version__ = "0.1.0"
