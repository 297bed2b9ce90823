"""The main demo: pretrain the tiny model on CPU on a small multilingual corpus of real speech.

``python -m xlsr.demo`` builds the corpus once from Debian packages (Asterisk's 16 kHz voice prompts in five
languages plus espeak-ng speech in eight more, see :mod:`xlsr.demo.corpus`), trains for a time budget and prints
the learning curve (:mod:`xlsr.demo.train`).
"""
