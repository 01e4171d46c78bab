"""Pure rules of the wallet: no I/O, standard library only."""
