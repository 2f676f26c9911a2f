"""Pricing on a fleet of instance types (cost.fleet): the request a profile's worker measures
(request.py), what the worker measures on its machine (measure.py), the decision across profiles
(choice.py) and its report (report.py). Dispatch to the work pools is Prefect's, in flows/fleet.py.

May import: every package above except train.
"""
