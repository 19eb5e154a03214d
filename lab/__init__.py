"""The lab: the commands that made the miniature world's shipped products (`python -m lab prompts|pretrain|
specialist|sample|latent-study`, lab/commands.py) and the studies behind docs/experiments.md (lab/studies/).
It sits on top of the stages; the world itself (miniature/) sits below them."""
