"""The ground floor: requant's errors, file locks, signal handling and write-failure messages.

Imports nothing of requant. Everything else may import it.
"""
