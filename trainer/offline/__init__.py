"""Offline stand-ins for the Hub: a tiny Gemma 3 and a synthetic Oxford-IIIT Pet set, for tests and demos.

Never imported by the trainer's run; `python -m trainer.offline.tiny DIR` and
`python -m trainer.offline.synthetic DIR` write them.
"""
