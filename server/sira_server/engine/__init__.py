"""The decision engine: in-process state that makes Assign answer without Postgres.

`catalog` keeps compiled definitions of live experiments, `posteriors` keeps the
bandit's Beta posteriors fresh, `decider` is the pure choice of an arm.
"""
