"""``--mode=explore``: a local web page that shows a trained run at work.

Draw or upload a digit and see what the model gets (the MNIST-style
preprocessing, step by step), its answer (every member's, for a K-member run
or an ensemble), every stage's feature maps with the filters behind them,
where it looked (integrated gradients) and what covering or shifting the
digit does.

* `networks`: a workdir's networks and their jitted fixed-shape programs,
  compiled once at start (no Gradio, no browser).
* `panels`: the numbers and pictures of each panel, as plain functions of an
  input and the networks (no Gradio, no browser).
* `page`: the panels' HTML (a Jinja2 template) and the drawing canvas.
* `app`: the Gradio page and its events; `server`: starting it safely.

Only `app` and `server` import Gradio (the ``explore`` extra).
"""
