from tasks.decide.pareto import Point, frontier, frontier_table, plot_frontier

POINTS = [Point("fp32", 390, 0.930, True), Point("int8", 195, 0.927, True), Point("mixed", 260, 0.931, True),
          Point("int4", 390, 0.921, False), Point("static", 195, 0.918, False)]


def test_frontier_keeps_only_undominated_points_cheapest_first():
    assert [p.name for p in frontier(POINTS)] == ["int8", "mixed"]


def test_frontier_table_marks_the_selected_point(tmp_path):
    rows = {r["name"]: r for r in frontier_table(POINTS, "int8")}
    assert rows["int8"]["selected"] and rows["int8"]["on_frontier"]
    assert not rows["fp32"]["on_frontier"]
    path = plot_frontier(POINTS, "int8", 0.915, tmp_path / "pareto.png")
    assert path.stat().st_size > 10_000
