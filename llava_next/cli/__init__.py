"""The command line: `llava-next inspect`, `run`, `convert` (main.py is the entry point) and the plan
drawn as a PNG. Imports everything below it; nothing imports it."""
