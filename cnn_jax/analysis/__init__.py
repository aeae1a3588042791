"""Analysis of a trained run: `report.analyze(config, workdir)` writes plots,
tables and an HTML report; `metrics`, `intermediates` and `plots` are its
parts (pure metrics, captures of the real model, matplotlib figures)."""
