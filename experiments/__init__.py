"""Paper reference numbers (``paper_tables/``), run collection, reports and plots."""
