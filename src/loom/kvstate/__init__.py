"""The state machine the replicated log drives. Pure: no IO, no clocks.

Apply is a pure function of (stored state, command bytes, what the primary stamped
into the entry): the same log yields the same state and the same results on every
replica (DESIGN §3).
"""
