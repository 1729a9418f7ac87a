"""What runs inside TorchServe: packed into the .mar as the package `handlers/`, with handler.py at its root.

decode.py: request payloads -> uint8 RGB tensors; classifier.py: tensors -> model -> answers;
drift.py: what served traffic looks like against the training reference; protocol.py: the Open
Inference Protocol's tensors to the core and back; handler.py: the TorchServe adapter; files.py and
archive.py: the archive's layout and reading it (for the tools outside TorchServe). Only handler.py imports TorchServe.
"""
