"""``python -m experiments.benchmark``: the throughput benchmark."""

from absl import app

from experiments.benchmark import throughput

app.run(throughput.main)
