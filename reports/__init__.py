"""prefixlab reports: plotly figure builders (figures.py), self-contained HTML assembly (html.py)
and `build_report` (build.py), which loads runs, runs the probes and writes one HTML file."""


def build_report(*args, **kwargs):
    """See `reports.build.build_report` (imported lazily: it pulls in the probes and torch)."""
    from reports.build import build_report as _build
    return _build(*args, **kwargs)
