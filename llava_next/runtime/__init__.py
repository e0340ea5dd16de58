"""Running the model for a user: the pipeline (checkpoint + prompt + media -> streamed answer, batches).
Imports inputs and model."""
