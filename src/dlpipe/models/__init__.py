"""Model families: one module each, ending in `FAMILY = dlpipe.family.Family(...)`.

Nothing here imports them: `dlpipe.family.get_family(name)` imports the one asked for, so DVC's
train@cnn runs (and depends on) models/cnn.py alone.
"""
