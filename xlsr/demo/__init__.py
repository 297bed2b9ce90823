"""The main demo: pretrain the tiny model on CPU on a small multilingual corpus of real speech, then fine-tune it.

``python -m xlsr.demo`` builds the corpus once from Debian packages (Asterisk's 16 kHz voice prompts in five
languages plus espeak-ng speech in eight more, see :mod:`xlsr.demo.corpus`), pretrains for a time budget and prints
the learning curve (:mod:`xlsr.demo.train`), then fine-tunes the model for CTC on the speech whose words are known
(:mod:`xlsr.demo.asr`, :mod:`xlsr.demo.finetune`) and prints its WER / CER before and after.
"""
