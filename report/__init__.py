"""``genserve report``: figures, GIFs and tables of trained and served models (``compare``:
a flow, a diffusion and a flow-matching model side by side; ``anomaly``: a served anomaly
model's scores), drawn by ``plots``."""
