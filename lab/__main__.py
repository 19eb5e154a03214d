"""`python -m lab <command>`: the miniature world's commands (lab/commands.py)."""
import training
from lab.commands import main

training.run_cli(main)
