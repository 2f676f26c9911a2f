"""Choosing: the pure selection rule (selection.py), Pareto front (pareto.py), accuracy-aware search
(search.py, mixed_search.py), the decision's records and checks (decision.py), the reports
(report.py, cost_analysis.py), and the same for decoders (decoder_selection.py, decoder_report.py).

May import: every package above except train.
"""
