"""Building blocks shared by the codec and the LM: rotary embeddings and ring-buffer attention."""
