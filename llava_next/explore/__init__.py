"""``llava-next explore``: an interactive page to look inside the model (Gradio, the ``explore`` extra).

- session.py: the loaded pipeline; each question prepared, its answer streamed, then traced ONCE, its numbers cached
- models.py: the other models a page loads on demand (the checkpoint with an adapter, the float model for gradients)
- gradients.py: a generated token's gradient map (relevancy, input x gradient, rollout)
- views.py: the pictures and tables drawn from a cached answer (research/plots.py), never the model
- exporting.py: the current figure as PNG / SVG (vector with matplotlib) and its numbers as JSON
- errors.py: the command line's one-line error messages, for the page
- page.py: the Gradio components and callbacks
- server.py: launch (127.0.0.1 unless told), the missing-Gradio message

Only page.py and server.py import gradio (inside functions), so this package imports without it.
"""
