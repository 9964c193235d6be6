"""Data contract, NIfTI I/O, study layouts, verification, preprocessing, datasets and the phantom."""
