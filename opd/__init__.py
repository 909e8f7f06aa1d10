"""opd: on-policy distillation of language models.

The student samples completions, the teacher scores every token, and the student lowers a
per-token divergence to the teacher on its own samples. See README.md and DESIGN notes.
"""

__version__ = "0.1.0"
