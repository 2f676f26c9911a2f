"""The fleet: every candidate priced on each instance type a worker can measure (cost.fleet)."""
