"""CTC fine-tuning of wav2vec 2.0 / XLS-R in fairseq's layout (task ``audio_finetuning``, labels ``ltr``).

Beside each manifest ``train.tsv`` lies ``train.ltr`` (one transcript per manifest row, letters separated by spaces,
``|`` ending every word) and, for the split's vocabulary, ``dict.ltr.txt`` (fairseq's ``Dictionary`` text file, the
CTC blank at index 0); ``python -m xlsr.manifest ... --transcripts table.tsv`` writes them. :mod:`.labels` reads and
writes these files, :mod:`.data` turns manifest + labels into padded CTC batches, :mod:`.wer` scores transcripts.
"""
