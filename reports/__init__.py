"""prefixlab reports: plotly figure builders (figures.py), self-contained HTML assembly (html.py)
and `build_report` (build.py), which loads runs, runs the probes and writes one HTML file."""


# Lazy import: reports.build pulls in the probes and torch; `import reports` stays light.
def build_report(*args, **kwargs):
    """See `reports.build.build_report` (imported lazily: it pulls in the probes and torch)."""
    from reports.build import build_report as _build
    return _build(*args, **kwargs)
