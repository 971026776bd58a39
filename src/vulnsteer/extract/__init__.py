"""From hidden states to directions: activations read at a position of each prompt, steering vectors fitted from
them (and the files that hold them), and probes that score detection without generation."""
