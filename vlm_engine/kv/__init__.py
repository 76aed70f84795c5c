"""KV memory the engine owns: pages in a pool allocated once, shared by reference.

- ``manager``: which pages each row holds, their reference counts and hashes (prefix
  caching), and what is free or cached; pure Python.
- ``pool``: the tensors (one K and one V pool per layer) and the budget that sizes them.
- ``cache``: what a transformers model sees as its cache for one packed forward: it writes
  the new tokens' K/V into their slots and computes each row's attention over its pages.
"""
