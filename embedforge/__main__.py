"""`python -m embedforge ...` (and `torchrun -m embedforge train ...`) runs the CLI."""

from embedforge.cli import main

main()
