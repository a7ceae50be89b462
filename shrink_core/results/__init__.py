"""The store (SQLite), candidates with lineage, Pareto fronts, figures and the report."""
