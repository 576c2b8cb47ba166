"""Physical drift (after raw2logit, Oala et al. 2023): a differentiable acquisition model (acquisition.py), drift
forensics (forensics.py: sensitivities and tolerances), synthesis (presets, parameter grids, post-hoc corruptions)
and optimisation (the worst-case drift)."""
