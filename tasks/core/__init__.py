"""The ground floor: requant's errors, file locks, signal handling and write-failure messages.

May import: nothing of requant. Every other package may import it.
"""
