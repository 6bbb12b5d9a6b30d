"""Loading students and teachers (Hugging Face directories, GGUF, hub ids) and the checks that
make their token ids comparable; the tiny built-in models tests and the lab start from.
"""
