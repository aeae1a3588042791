"""Analysis of a trained run: `report.analyze(config, workdir)` writes an HTML
report that explains the model with the run's own numbers. Its parts:
`evaluation` (metrics and figures from test probabilities), `internals`
(what the model computes, via `architecture` and `intermediates`),
`captions` (computed sentences), `compare` (two runs side by side), `page`
(the Jinja2 template), `metrics`, `plots` and `lesson_plots`."""
