"""Teachers that score the student's tokens: in-process Hugging Face, vLLM servers over HTTP,
and `opd serve-teacher`, the server side.
"""
