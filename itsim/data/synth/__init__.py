"""Synthetic captioned images, itsim's embedded default data: a scene (scene), its paraphrased captions
(captions), and the files and CLI (writer)."""
from itsim.data.synth.writer import SynthConfig, add_cli, generate, run

__all__ = ["SynthConfig", "add_cli", "generate", "run"]
