"""Choosing a plan: a method's clusters turned into a `PruningPlan` (`build`), and candidate plans
scored end to end against the unpruned model on held-aside calibration tokens (`scoring`)."""
