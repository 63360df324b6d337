"""Ray Tune sweeps over the training loops: `spec` (the sweep file), `trial` (one trial: a Ray Train
run), `tuner` (the sweep), `results` and `plot` (what it leaves)."""
