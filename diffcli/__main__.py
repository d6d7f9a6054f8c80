"""`python -m diffcli ...` runs the `diffcli` command."""
from .cli import main

main()
