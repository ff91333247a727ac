"""Templates of the files ``plan.save`` writes: ``stage.py`` fills in one
``stage_<k>.py`` from a stage graph; ``run.py`` is copied as is."""
