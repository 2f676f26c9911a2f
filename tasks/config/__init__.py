"""params.yaml as typed settings: one section per stage (settings.py), declared search grids
(search_space.py), reading and checking the file (loading.py).

May import: core, recipes (to check every recipe config when the file is read).
"""
