"""The tools that run an exported file rather than write one: latency (``bench``), its
profile (``bench --profile``), accuracy (``evaluate``), and the forked child that checks a
file before a session opens it. Opening a session itself (`export.session`) stays with the
exporter, whose verification opens one too."""
