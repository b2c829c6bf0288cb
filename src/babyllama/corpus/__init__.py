"""Reading the raw files users bring (text, JSON lines, JSON arrays, CSV, Parquet; UTF-8 or a named
encoding), one document at a time with its file and line. Tokenizer training and data preparation
both read through here, so neither imports the other."""
