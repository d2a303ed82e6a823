"""Quality: metrics (torch-free), the checks and report of `edgetl lint`, self-contained HTML pages."""
