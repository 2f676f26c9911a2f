"""Choosing: the pure selection rule (selection.py), Pareto front (pareto.py), accuracy-aware search
(search.py, mixed_search.py), the decision's records and checks (decision.py), and the reports
(report.py, cost_analysis.py).

May import: every package above except train.
"""
