"""Generated API of the SIRA decision server, by proto package version."""
