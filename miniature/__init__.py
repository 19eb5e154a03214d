"""The miniature world: world.py (prompts, renderer, scorers) and model.py (the tiny SD3 model and its
loader), the shipped base model (base/) and the published teachers (teachers/). It imports only common.py
and loading.py, so the stages, rewards and evaluation can build on it; its commands are in lab/."""
