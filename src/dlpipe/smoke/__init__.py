"""`make smoke`: the whole pipeline on small slices of the real data, in a throw-away copy.

`params` shrinks params.yaml, `workspace` builds the isolated copy, `checks` says what a finished
run must show, `run` drives `dvc repro` and prints the summary.
"""
