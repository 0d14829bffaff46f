"""Data: sources (a registry) → partition → client shards (Arrow, memory-mapped); each dataset's task.

Import the module you need (``raymed.data.shards``, ``raymed.data.sources``, ...): this package
imports nothing itself, so that importing one data module never imports the others.
"""
