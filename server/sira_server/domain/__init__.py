"""Pure logic of SIRA: experiments and their lifecycle, validation, targeting, bandit math,
statistics. No I/O here: everything is a function of its arguments, unit-tested directly."""
