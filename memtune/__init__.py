"""memtune: will this LLM fine-tune fit in GPU memory, and what is the cheapest way to run it?"""

__version__ = "0.1.0"
