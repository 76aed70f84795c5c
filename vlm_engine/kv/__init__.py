"""KV memory the engine owns: pages in a pool allocated once, a page table per row.

- ``pages``: which pages each row holds (allocate, grow, free, can-admit); pure Python.
- ``pool``: the tensors (one K and one V pool per layer) and the budget that sizes them.
- ``cache``: what a transformers model sees as its cache for one forward: it writes the
  new tokens' K/V into the rows' pages and gives attention each row's K/V.
"""
