"""The paper's recipes as library calls: teacher responses for a cold start, the cold-start
pipeline, teacher-aligned prompt selection.
"""
